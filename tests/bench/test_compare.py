"""`fp4serve bench compare` on two fixture summaries."""

from __future__ import annotations

import json

import pytest

from fp4serve.cli import main
from fp4serve.errors import BenchError


def level(category, concurrency, agg, decode, ttft, errors=0, temperature=0.0, kind="category"):
    dist = lambda v: {"mean": v, "p50": v, "p95": v, "p99": v, "min": v, "max": v}
    return {"kind": kind, "category": category, "concurrency": concurrency, "temperature": temperature, "requests": 8,
            "errors": errors, "output_tok_s": agg, "decode_tok_s": dist(decode), "ttft_s": dist(ttft)}  # fmt: skip


def write(path, label, levels):
    path.mkdir()
    (path / "summary.json").write_text(json.dumps({"meta": {"label": label}, "levels": levels}))
    return path


def test_compare_prints_ratios_of_shared_levels(tmp_path, capsys):
    a = write(tmp_path / "llama.cpp", "llama.cpp Q4_1", [level("coding", 1, 100.0, 50.0, 0.2), level("coding", 4, 200.0, 40.0, 0.4),
                                                         level("math", 1, 80.0, 40.0, 0.1)])  # fmt: skip
    b = write(tmp_path / "fp4serve", "fp4serve bf16", [level("coding", 1, 150.0, 75.0, 0.1), level("coding", 4, 500.0, 60.0, 0.8, errors=1),
                                                        level("prose", 1, 10.0, 10.0, 0.1)])  # fmt: skip
    main(["bench", "compare", str(a), str(b / "summary.json")])
    out = capsys.readouterr().out
    assert "A: llama.cpp Q4_1" in out and "B: fp4serve bf16" in out
    rows = [line for line in out.splitlines() if line.startswith("| T=")]
    assert len(rows) == 2  # math and prose were measured by one run only
    assert rows[0].split(" | ")[1:] == [
        "Coding",
        "1",
        "100.0",
        "150.0",
        "1.50x",
        "50.0",
        "75.0",
        "1.50x",
        "200 ms",
        "100 ms",
        "0.50x",
        "0 / 0 |",
    ]
    assert "2.50x" in rows[1] and "2.00x" in rows[1] and "0 / 1" in rows[1]


def test_compare_without_shared_levels_or_with_a_bad_file(tmp_path):
    a = write(tmp_path / "a", "a", [level("coding", 1, 1.0, 1.0, 0.1)])
    b = write(tmp_path / "b", "b", [level("coding", 1, 1.0, 1.0, 0.1, temperature=0.7)])
    from fp4serve.bench.compare import compare, load_summary

    with pytest.raises(BenchError, match="share no level"):
        compare(load_summary(a), load_summary(b))
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(BenchError, match="not a summary.json"):
        load_summary(tmp_path / "junk.json")
    with pytest.raises(SystemExit):  # the CLI prints the error and exits 2
        main(["bench", "compare", str(tmp_path / "none.json"), str(b)])
