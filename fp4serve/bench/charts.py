"""Small PNG charts of a run (matplotlib, no display needed): aggregate tok/s vs concurrency per
category, per-request decode tok/s vs concurrency, TTFT p50/p95 vs concurrency."""

from __future__ import annotations

from pathlib import Path

from fp4serve.bench.workloads import CATEGORY_TITLES


def _per_category(levels: list[dict], temperature: float) -> dict[str, list[dict]]:
    series: dict[str, list[dict]] = {}
    for lv in levels:
        if lv["kind"] == "category" and lv["temperature"] == temperature:
            series.setdefault(lv["category"], []).append(lv)
    return {name: sorted(lvs, key=lambda lv: lv["concurrency"]) for name, lvs in series.items()}


def write_charts(summary: dict, out: Path) -> list[str]:
    """The PNG file names written under `out` (none when the run has a single concurrency level)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = summary["levels"]
    temperatures = sorted({lv["temperature"] for lv in levels if lv["kind"] == "category"})
    if len({lv["concurrency"] for lv in levels}) < 2:
        return []
    names = []
    for temperature in temperatures:
        suffix = "" if len(temperatures) == 1 else f"_t{temperature:g}"
        series = _per_category(levels, temperature)
        charts = [
            (f"aggregate_tok_s{suffix}.png", "Aggregate output tok/s", lambda lv: lv["output_tok_s"]),
            (f"decode_tok_s{suffix}.png", "Per-request decode tok/s (p50)", lambda lv: lv["decode_tok_s"]["p50"]),
        ]
        for file_name, ylabel, metric in charts:
            fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
            for name, lvs in series.items():
                ax.plot(
                    [lv["concurrency"] for lv in lvs],
                    [metric(lv) for lv in lvs],
                    marker="o",
                    label=CATEGORY_TITLES.get(name, name),
                )
            _finish(fig, ax, ylabel, temperature, out / file_name)
            names.append(file_name)
        overall = [row for row in summary["overall"] if row["temperature"] == temperature]
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
        for q in ("p50", "p95"):
            ax.plot(
                [row["concurrency"] for row in overall],
                [_ms(row["ttft_s"][q]) for row in overall],
                marker="o",
                label=f"TTFT {q}",
            )
        _finish(fig, ax, "TTFT (ms), all categories", temperature, out / f"ttft{suffix}.png")
        names.append(f"ttft{suffix}.png")
    plt.close("all")
    return names


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _finish(fig, ax, ylabel: str, temperature: float, path: Path) -> None:
    import matplotlib.pyplot as plt

    ax.set_xscale("log", base=2)
    ticks = sorted({x for line in ax.get_lines() for x in line.get_xdata()})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} (T={temperature:g})", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
