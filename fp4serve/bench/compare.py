"""`fp4serve bench compare A B`: two runs' summaries side by side, level by level, with B / A ratios
(e.g. A = llama.cpp, B = fp4serve, same machine and workload)."""

from __future__ import annotations

import json
from pathlib import Path

from fp4serve.bench.report import fmt_rate, fmt_time, table, title
from fp4serve.errors import BenchError


def load_summary(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read a bench summary from {path}: {e}") from None
    if not isinstance(summary, dict) or "levels" not in summary or "meta" not in summary:
        raise BenchError(f"{path} is not a summary.json written by fp4serve bench serve")
    return summary


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b is not None else "–"


def compare(a: dict, b: dict) -> str:
    """A Markdown table of the levels both runs measured."""
    key = lambda lv: (lv["kind"], lv["temperature"], lv["category"], lv["concurrency"])
    levels_b = {key(lv): lv for lv in b["levels"]}
    rows = []
    for lv_a in a["levels"]:
        lv_b = levels_b.get(key(lv_a))
        if lv_b is None:
            continue
        agg_a, agg_b = lv_a["output_tok_s"], lv_b["output_tok_s"]
        dec_a, dec_b = lv_a["decode_tok_s"]["p50"], lv_b["decode_tok_s"]["p50"]
        ttft_a, ttft_b = lv_a["ttft_s"]["p50"], lv_b["ttft_s"]["p50"]
        rows.append(
            [
                f"T={lv_a['temperature']:g}",
                title(lv_a["category"]),
                str(lv_a["concurrency"]),
                fmt_rate(agg_a),
                fmt_rate(agg_b),
                _ratio(agg_a, agg_b),
                fmt_rate(dec_a),
                fmt_rate(dec_b),
                _ratio(dec_a, dec_b),
                fmt_time(ttft_a),
                fmt_time(ttft_b),
                _ratio(ttft_a, ttft_b),
                f"{lv_a['errors']} / {lv_b['errors']}",
            ]
        )
    if not rows:
        raise BenchError("the two runs share no level (same temperature, category and concurrency)")
    header = [
        "Mode",
        "Category",
        "c",
        "A agg tok/s",
        "B agg tok/s",
        "B/A",
        "A decode p50",
        "B decode p50",
        "B/A",
        "A TTFT p50",
        "B TTFT p50",
        "B/A (lower is better)",
        "Errors A / B",
    ]
    return f"A: {a['meta']['label']}\nB: {b['meta']['label']}\n\n" + table(header, rows) + "\n"
