"""Percentile math against numpy, and one level's summary computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fp4serve.bench.stats import distribution, percentile, summarize_level


@given(st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
def test_percentile_matches_numpy_linear(values, q):
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), rel=1e-9, abs=1e-6)


def test_percentile_by_hand():
    assert percentile([4, 1, 3, 2], 50) == 2.5  # unsorted input; midpoint of 2 and 3
    assert percentile([10, 20], 95) == pytest.approx(19.5)
    assert percentile([7], 99) == 7
    assert percentile([], 50) is None  # an empty level is "no data", not 0
    with pytest.raises(ValueError, match="0..100"):
        percentile([1], 101)


def test_distribution_of_nothing_is_none():
    assert set(distribution([]).values()) == {None}


def result(ttft, e2e, tokens, prompt=10, itl=(), error=None):
    tpot = (e2e - ttft) / (tokens - 1) if not error and tokens > 1 else None
    return {
        "ttft_s": ttft, "e2e_s": e2e, "output_tokens": tokens, "prompt_tokens": prompt, "itl_s": list(itl),
        "tpot_s": tpot, "decode_tok_s": 1 / tpot if tpot else None, "prefill_tok_s": prompt / ttft if ttft else None,
        "usage_reported": True, "error": error,
    }  # fmt: skip


def test_summarize_level_by_hand():
    results = [
        result(0.1, 1.1, 11, itl=[0.1] * 10),  # 10 tokens in 1.0 s after the first: 10 tok/s
        result(0.2, 2.2, 21, itl=[0.1] * 20),  # 20 tokens in 2.0 s: also 10 tok/s
        result(None, 0.05, 0, error="HTTP 500: boom"),
        result(None, 0.05, 0, error="HTTP 500: boom"),
    ]
    s = summarize_level(results, wall_s=4.0)
    assert (s["requests"], s["completed"], s["errors"]) == (4, 2, 2)
    assert s["error_messages"] == ["HTTP 500: boom"]
    assert s["output_tokens"] == 32 and s["output_tok_s"] == 8.0  # failed requests add no tokens
    assert s["request_throughput"] == 0.5
    assert s["ttft_s"]["p50"] == pytest.approx(0.15) and s["ttft_s"]["max"] == 0.2
    assert s["decode_tok_s"]["p50"] == pytest.approx(10.0)
    assert s["prefill_tok_s"]["max"] == pytest.approx(100.0)
    assert s["e2e_s"]["min"] == 1.1  # errors are not in the latency distributions
    assert s["itl_s"]["mean"] == pytest.approx(0.1)
