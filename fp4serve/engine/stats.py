"""Engine counters and latency histograms, with vLLM's meanings, for the server's /metrics.

The engine thread records; the server reads a `snapshot()` from another thread, so both go through
one lock (a few dict and list updates per step: no measurable cost). Gauges that the scheduler and
block pool already know (running, waiting, KV usage, prefix-cache queries) are read there at scrape
time instead of being copied here.

Latencies follow vLLM v1: time to first token and end-to-end latency from the moment the engine
received the request; one inter-token latency per step that gave a request new tokens (a
speculative step that commits several tokens counts once, with its whole interval).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from fp4serve.outputs import RequestOutput

# vLLM's bucket bounds (seconds), so dashboards built for vLLM read these unchanged.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


@dataclass
class Histogram:
    """Observations counted per bucket: counts[i] holds values <= bounds[i] and > bounds[i-1];
    the last count is the +Inf bucket."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self):
        self.counts = self.counts or [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)


@dataclass
class StatsSnapshot:
    prompt_tokens: int
    generation_tokens: int
    finished: dict[str, int]  # finish reason -> requests
    time_to_first_token: Histogram
    inter_token_latency: Histogram
    e2e_latency: Histogram


@dataclass
class _Timing:
    arrival: float
    last_token: float | None = None


class EngineStats:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._timings: dict[str, _Timing] = {}
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter[str] = Counter()
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.inter_token_latency = Histogram(ITL_BUCKETS)
        self.e2e_latency = Histogram(E2E_BUCKETS)

    def request_added(self, request_id: str) -> None:
        with self._lock:
            self._timings[request_id] = _Timing(self._clock())

    def record(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs (or an abort's): new tokens, first-token and inter-token times, and
        the end of finished requests."""
        now = self._clock()
        with self._lock:
            for output in outputs:
                timing = self._timings.get(output.request_id)
                if timing is None:
                    continue
                if output.delta_token_ids:
                    self.generation_tokens += len(output.delta_token_ids)
                    if timing.last_token is None:
                        self.prompt_tokens += len(output.prompt_token_ids)
                        self.time_to_first_token.observe(now - timing.arrival)
                    else:
                        self.inter_token_latency.observe(now - timing.last_token)
                    timing.last_token = now
                if output.finished:
                    del self._timings[output.request_id]
                    self.finished[output.outputs[0].finish_reason or "abort"] += 1
                    self.e2e_latency.observe(now - timing.arrival)

    def snapshot(self) -> StatsSnapshot:
        with self._lock:
            return StatsSnapshot(
                self.prompt_tokens, self.generation_tokens, dict(self.finished), self.time_to_first_token.copy(),
                self.inter_token_latency.copy(), self.e2e_latency.copy(),
            )  # fmt: skip


class PhaseTimer:
    """Wall time of consecutive start-up phases, for one log line."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self._last = time.perf_counter()

    def done(self, phase: str) -> None:
        now = time.perf_counter()
        self.times[phase] = self.times.get(phase, 0.0) + now - self._last
        self._last = now

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.2f} s" for phase, seconds in self.times.items())
