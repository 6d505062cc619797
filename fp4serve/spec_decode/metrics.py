"""Speculative-decoding counters with vLLM's meanings (docs/reference.md section 7)."""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

from fp4serve import metric_names as names
from fp4serve.spec_decode.acceptance_watch import AcceptanceWatch

log = logging.getLogger(__name__)


@dataclass
class SpecDecodingStats:
    num_speculative_tokens: int
    num_drafts: int = 0  # verification steps that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.accepted_per_position:
            self.accepted_per_position = [0] * self.num_speculative_tokens

    def observe(self, num_draft_tokens: int, num_accepted: int) -> None:
        """One request's verification step: num_draft_tokens proposed, the first num_accepted accepted."""
        if num_draft_tokens == 0:
            return
        self.num_drafts += 1
        self.num_draft_tokens += num_draft_tokens
        self.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            self.accepted_per_position[position] += 1

    @property
    def mean_acceptance_length(self) -> float:
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    def per_position_rates(self) -> list[float]:
        return [n / self.num_drafts if self.num_drafts else 0.0 for n in self.accepted_per_position]


@dataclass
class Counter:
    """One counter, shaped like vllm.v1.metrics.reader.Counter (what vLLM's LLM.get_metrics() returns)."""

    name: str
    value: int
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Vector:
    """A counter per position, shaped like vllm.v1.metrics.reader.Vector."""

    name: str
    values: list[int]
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class Gauge:
    """One gauge, shaped like vllm.v1.metrics.reader.Gauge."""

    name: str
    value: float
    labels: dict[str, str] = field(default_factory=dict)


def spec_decode_metrics(stats: SpecDecodingStats, watch: AcceptanceWatch) -> list[Counter | Vector | Gauge]:
    """The counters under vLLM's metric names, then the watch's recent and running acceptance rates
    (fp4serve's own names, labelled with the drafter method), for LLM.get_metrics() and /metrics."""
    recent, running = watch.rates()
    method = {"method": watch.method}
    return [
        Counter(names.SPEC_DECODE_NUM_DRAFTS, stats.num_drafts),
        Counter(names.SPEC_DECODE_NUM_DRAFT_TOKENS, stats.num_draft_tokens),
        Counter(names.SPEC_DECODE_NUM_ACCEPTED_TOKENS, stats.num_accepted_tokens),
        Vector(names.SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS, list(stats.accepted_per_position)),
        Gauge(names.SPEC_DECODE_ACCEPTANCE_RATE_RECENT, recent, method),
        Gauge(names.SPEC_DECODE_ACCEPTANCE_RATE_RUNNING, running, method),
    ]


class SpecDecodingLogger:
    """Logs the counters' change over each interval, in the shape of vLLM's line:
    mean acceptance length, acceptance rate, per-position rates, accepted and drafted tokens."""

    def __init__(self, stats: SpecDecodingStats, interval_s: float = 10.0):
        self.stats, self.interval_s = stats, interval_s
        self.last = copy.deepcopy(stats)
        self.last_time = time.monotonic()

    def maybe_log(self) -> None:
        now = time.monotonic()
        if now - self.last_time < self.interval_s or self.stats.num_drafts == self.last.num_drafts:
            return
        s, last = self.stats, self.last
        delta = SpecDecodingStats(
            s.num_speculative_tokens,
            s.num_drafts - last.num_drafts,
            s.num_draft_tokens - last.num_draft_tokens,
            s.num_accepted_tokens - last.num_accepted_tokens,
            [a - b for a, b in zip(s.accepted_per_position, last.accepted_per_position)],
        )
        log.info(
            "SpecDecoding metrics: Mean acceptance length: %.2f, Accepted throughput: %.2f tokens/s, "
            "Drafted throughput: %.2f tokens/s, Accepted: %d tokens, Drafted: %d tokens, "
            "Per-position acceptance rate: %s, Avg Draft acceptance rate: %.1f%%",
            delta.mean_acceptance_length,
            delta.num_accepted_tokens / (now - self.last_time),
            delta.num_draft_tokens / (now - self.last_time),
            delta.num_accepted_tokens,
            delta.num_draft_tokens,
            ", ".join(f"{r:.3f}" for r in delta.per_position_rates()),
            100 * delta.acceptance_rate,
        )
        self.last, self.last_time = copy.deepcopy(s), now
