"""EngineStats: latencies measured from the right moments and counted in the right buckets."""

from __future__ import annotations

from fp4serve.engine.stats import EngineStats, Histogram
from fp4serve.outputs import CompletionOutput, RequestOutput


def output(request_id: str, new_tokens: int, finish: str | None = None) -> RequestOutput:
    completion = CompletionOutput(0, "", [], None, None, finish_reason=finish)
    return RequestOutput(request_id, None, [1, 2, 3], [completion], finish is not None,
                         delta_token_ids=[7] * new_tokens)  # fmt: skip


def test_latencies_and_counters():
    now = [100.0]
    stats = EngineStats(clock=lambda: now[0])
    stats.request_added("a")
    now[0] = 100.5
    stats.request_added("b")
    now[0] = 101.0
    stats.record([output("a", 1), output("b", 0)])  # a's first token; b still in prefill
    now[0] = 101.25
    stats.record([output("a", 2), output("b", 1)])  # a: a 2-token (speculative) step; b's first token
    now[0] = 103.0
    stats.record([output("a", 1, "stop"), output("b", 0, "abort")])
    stats.record([output("unknown", 1)])  # not added here (e.g. already finished): ignored

    snap = stats.snapshot()
    assert (snap.prompt_tokens, snap.generation_tokens) == (6, 5)
    assert snap.finished == {"stop": 1, "abort": 1}
    assert snap.time_to_first_token.count == 2 and snap.time_to_first_token.sum == 1.0 + 0.75
    assert snap.inter_token_latency.count == 2 and snap.inter_token_latency.sum == 0.25 + 1.75
    assert snap.e2e_latency.count == 2 and snap.e2e_latency.sum == 3.0 + 2.5
    stats.record([output("a", 1)])  # the snapshot is a copy
    assert snap.generation_tokens == 5


def test_histogram_buckets_are_upper_inclusive():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.counts == [2, 2, 1] and histogram.count == 5
