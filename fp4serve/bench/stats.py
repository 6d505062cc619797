"""Percentiles and the per-level summary of request results."""

from __future__ import annotations

import math
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) by linear interpolation between closest ranks (numpy's default);
    None for no values, so an empty level never reads as 0 ms."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within 0..100, got {q}")
    data = sorted(values)
    if not data:
        return None
    rank = (len(data) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (rank - low)


def distribution(values: Sequence[float]) -> dict:
    """mean, p50, p95, p99, min, max (None when there are no values)."""
    return {
        "mean": sum(values) / len(values) if values else None,
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "min": min(values) if values else None,
        "max": max(values) if values else None,
    }


def summarize_level(results: Sequence[dict], wall_s: float) -> dict:
    """One concurrency level: aggregate rates over the level's wall time, distributions over the
    successful requests, and every error message. `results` are RequestResult dicts."""
    ok = [r for r in results if r["error"] is None]
    output_tokens = sum(r["output_tokens"] for r in ok)
    prompt_tokens = [r["prompt_tokens"] for r in ok if r["prompt_tokens"] is not None]
    itl = [gap for r in ok for gap in r["itl_s"]]
    return {
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_messages": sorted({r["error"] for r in results if r["error"] is not None}),
        "wall_s": wall_s,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / wall_s if wall_s > 0 else None,
        "request_throughput": len(ok) / wall_s if wall_s > 0 else None,
        "prompt_tokens": distribution(prompt_tokens),
        "ttft_s": distribution([r["ttft_s"] for r in ok if r["ttft_s"] is not None]),
        "tpot_s": distribution([r["tpot_s"] for r in ok if r["tpot_s"] is not None]),
        "itl_s": distribution(itl),
        "e2e_s": distribution([r["e2e_s"] for r in ok]),
        "decode_tok_s": distribution([r["decode_tok_s"] for r in ok if r["decode_tok_s"] is not None]),
        "prefill_tok_s": distribution([r["prefill_tok_s"] for r in ok if r["prefill_tok_s"] is not None]),
        "usage_reported": all(r["usage_reported"] for r in ok) if ok else None,
    }
