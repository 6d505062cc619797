"""Result files of a run: raw per-request JSONL, summary JSON and a Markdown report whose tables
have the shapes of the source documents (single-stream by category, aggregate throughput vs
concurrency, TTFT vs concurrency, long-context tiers, greedy vs sampled)."""

from __future__ import annotations

import json
from pathlib import Path
from statistics import median

from fp4serve.bench.stats import distribution
from fp4serve.bench.sweep import Level
from fp4serve.bench.workloads import CATEGORY_TITLES


def write_results(out: Path, meta: dict, levels: list[Level]) -> dict:
    """requests.jsonl and summary.json under `out`; returns the summary."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "requests.jsonl", "w") as f:
        for level in levels:
            f.writelines(json.dumps({"kind": level.kind, **result.to_dict()}) + "\n" for result in level.results)
    summary = {"meta": meta, "levels": [level.to_dict() for level in levels], "overall": overall(levels)}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def overall(levels: list[Level]) -> list[dict]:
    """Per temperature and concurrency, over every category: pooled TTFT, errors, and the median of
    the categories' aggregate tok/s (categories run one after another, so their rates are not summed)."""
    rows = []
    keys = sorted({(lv.temperature, lv.concurrency) for lv in levels if lv.kind == "category"})
    for temperature, concurrency in keys:
        group = [
            lv
            for lv in levels
            if lv.kind == "category" and (lv.temperature, lv.concurrency) == (temperature, concurrency)
        ]
        ok = [r for lv in group for r in lv.results if r.error is None]
        rates = [lv.summary["output_tok_s"] for lv in group if lv.summary["output_tok_s"] is not None]
        rows.append(
            {
                "temperature": temperature,
                "concurrency": concurrency,
                "requests": sum(lv.summary["requests"] for lv in group),
                "errors": sum(lv.summary["errors"] for lv in group),
                "output_tok_s_median": median(rates) if rates else None,
                "ttft_s": distribution([r.ttft_s for r in ok if r.ttft_s is not None]),
                "decode_tok_s": distribution([r.decode_tok_s for r in ok if r.decode_tok_s is not None]),
            }
        )
    return rows


# ---- formatting ---------------------------------------------------------------------------------
def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def fmt_rate(value: float | None, unit: str = "") -> str:
    return "–" if value is None else f"{value:,.1f}{unit}"


def fmt_acceptance(spec: dict) -> str:
    if spec["status"] != "ok":
        return spec["status"]
    return f"{spec['acceptance_rate']:.1%} (len {spec['mean_acceptance_length']:.2f})"


def title(category: str) -> str:
    return CATEGORY_TITLES.get(category, category)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# ---- the Markdown report ------------------------------------------------------------------------
def markdown(summary: dict, charts: list[str]) -> str:
    meta = summary["meta"]
    levels = summary["levels"]
    parts = [
        f"# fp4serve bench: {meta['label']}",
        "",
        (
            f"Server {meta['base_url']} ({meta['server']}), model `{meta['model']}`, {meta['endpoint']} endpoint, "
            f"max_tokens {meta['max_tokens']}{', ignore_eos' if meta.get('ignore_eos') else ''}, "
            f"workload {meta['workload']}, {meta['level_size']} per level, warm-up {meta['warmup']} requests. "
            f"Date {meta['date']}. Prompt tokens for padding counted by: {meta['token_count_method']}."
        ),
        "",
        f"Command: `{meta['command']}`",
    ]
    if meta.get("client_machine"):
        load = meta.get("load_average") or ["?", "?"]
        parts += [
            "",
            f"Client machine: {meta['client_machine']}; 1-minute load average {load[0]} at start, {load[1]} at end.",
        ]
    if any(lv["usage_reported"] is False for lv in levels):
        parts += ["", "Note: the server sent no `usage` in some streams; their output tokens are counted from chunks."]
    temperatures = sorted({lv["temperature"] for lv in levels})
    for temperature in temperatures:
        at_t = [lv for lv in levels if lv["temperature"] == temperature]
        mode = "greedy" if temperature == 0 else "sampled"
        parts += ["", f"## T = {temperature:g} ({mode})"]
        parts += single_stream_section(at_t)
        parts += concurrency_sections(at_t, [row for row in summary["overall"] if row["temperature"] == temperature])
        parts += long_context_section(at_t)
    if len(temperatures) > 1:
        parts += greedy_vs_sampled(summary["overall"])
    parts += error_section(levels)
    if charts:
        parts += ["", "## Charts", ""] + [f"![{name}]({name})" for name in charts]
    parts += [
        "",
        (
            "Definitions: TTFT = time to the first streamed token; TPOT = (end-to-end - TTFT) / (output tokens - 1); "
            "per-request decode tok/s = 1 / TPOT; aggregate tok/s = output tokens of a level / its wall time; prefill = "
            "prompt tokens / TTFT. Output tokens come from the stream's usage. Acceptance = accepted / draft tokens "
            'from the server\'s /metrics (vLLM counter names), length = 1 + accepted / drafts; "not reported" means '
            "the server exports no such counters."
        ),
    ]
    return "\n".join(parts) + "\n"


def single_stream_section(levels: list[dict]) -> list[str]:
    categories = [lv for lv in levels if lv["kind"] == "category"]
    if not categories:
        return []
    lowest = min(lv["concurrency"] for lv in categories)
    rows = []
    for lv in (lv for lv in categories if lv["concurrency"] == lowest):
        rows.append(
            [
                title(lv["category"]),
                fmt_rate(lv["decode_tok_s"]["p50"]),
                fmt_time(lv["ttft_s"]["p50"]),
                fmt_time(lv["tpot_s"]["p50"]),
                fmt_rate(lv["prefill_tok_s"]["p50"], " tok/s"),
                fmt_acceptance(lv["spec_decode"]),
                f"{lv['errors']}/{lv['requests']}",
            ]
        )
    header = ["Category", "Decode tok/s", "TTFT p50", "TPOT p50", "Prefill (PP)", "Draft accept", "Errors"]
    return ["", f"### Single-stream (c={lowest}), by category (p50 over requests)", "", table(header, rows)]


def concurrency_sections(levels: list[dict], overall_rows: list[dict]) -> list[str]:
    categories = [lv for lv in levels if lv["kind"] == "category"]
    if not categories:
        return []
    names = list(dict.fromkeys(lv["category"] for lv in categories))
    by_key = {(lv["category"], lv["concurrency"]): lv for lv in categories}
    concurrencies = sorted({lv["concurrency"] for lv in categories})

    def grid(metric) -> str:
        rows = [[str(c)] + [metric(by_key.get((n, c))) for n in names] for c in concurrencies]
        return table(["Concurrency"] + [title(n) for n in names], rows)

    ttft_rows = [
        [
            str(row["concurrency"]),
            fmt_time(row["ttft_s"]["p50"]),
            fmt_time(row["ttft_s"]["p95"]),
            fmt_time(row["ttft_s"]["min"]),
            fmt_time(row["ttft_s"]["max"]),
            fmt_rate(row["decode_tok_s"]["p50"]),
            f"{row['errors']}/{row['requests']}",
        ]
        for row in overall_rows
    ]
    return [
        "",
        "### Aggregate output tok/s vs concurrency, by category",
        "",
        grid(lambda lv: fmt_rate(lv and lv["output_tok_s"])),
        "",
        "### Per-request decode tok/s (p50) vs concurrency",
        "",
        grid(lambda lv: fmt_rate(lv and lv["decode_tok_s"]["p50"])),
        "",
        "### TTFT vs concurrency (all categories)",
        "",
        table(["Concurrent", "TTFT p50", "TTFT p95", "TTFT min", "TTFT max", "Decode p50", "Errors"], ttft_rows),
        "",
        "### Draft acceptance vs concurrency",
        "",
        grid(lambda lv: fmt_acceptance(lv["spec_decode"]) if lv else "–"),
    ]


def long_context_section(levels: list[dict]) -> list[str]:
    tiers = [lv for lv in levels if lv["kind"] == "long_context"]
    if not tiers:
        return []
    rows = [
        [
            lv["category"],
            fmt_rate(lv["prompt_tokens"]["p50"]),
            fmt_rate(lv["decode_tok_s"]["p50"]),
            fmt_time(lv["ttft_s"]["p50"]),
            fmt_rate(lv["prefill_tok_s"]["p50"], " tok/s"),
            fmt_acceptance(lv["spec_decode"]),
            f"{lv['errors']}/{lv['requests']}",
        ]
        for lv in tiers
    ]
    header = [
        "Context tier",
        "Measured prompt (p50)",
        "Decode tok/s (c=1)",
        "TTFT (c=1)",
        "Prefill",
        "Draft accept",
        "Errors",
    ]
    return ["", "### Long-context tiers", "", table(header, rows)]


def greedy_vs_sampled(overall_rows: list[dict]) -> list[str]:
    lowest = min(row["concurrency"] for row in overall_rows)
    rows = [
        [
            f"T={row['temperature']:g}",
            fmt_rate(row["decode_tok_s"]["p50"]),
            fmt_rate(row["decode_tok_s"]["p95"]),
            fmt_time(row["ttft_s"]["p50"]),
        ]
        for row in overall_rows
        if row["concurrency"] == lowest
    ]
    return [
        "",
        f"## Greedy vs sampled (c={lowest}, all categories)",
        "",
        table(["Mode", "Decode p50", "Decode p95", "TTFT p50"], rows),
    ]


def error_section(levels: list[dict]) -> list[str]:
    total = sum(lv["requests"] for lv in levels)
    errors = sum(lv["errors"] for lv in levels)
    lines = [
        "",
        "## Errors",
        "",
        f"{errors} of {total} requests failed ({errors / total:.1%})." if total else "No requests ran.",
    ]
    for lv in levels:
        for message in lv["error_messages"]:
            lines.append(f"- T={lv['temperature']:g} {lv['category']} c={lv['concurrency']}: {message}")
    return lines
