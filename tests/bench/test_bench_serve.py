"""`fp4serve bench serve` end to end against the fp4serve it starts (a subprocess) on the embedded
default model: every report file, values that agree with the raw requests, and no errors. Small
token counts keep it quick."""

from __future__ import annotations

import json

import pytest

from fp4serve.bench.local_server import LocalServer
from fp4serve.cli import main
from fp4serve.errors import BenchError

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def run_dir(smollm2_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench-run")
    main([
        "bench", "serve", "--serve-args", f"{smollm2_path} --max-model-len 1024",
        "--categories", "coding,math", "--concurrency", "1,2", "--num-prompts", "2", "--max-tokens", str(MAX_TOKENS),
        "--warmup", "1", "--long-context", "300", "--long-context-prompts", "1", "--no-progress", "--out", str(out),
    ])  # fmt: skip
    return out


def test_run_writes_every_report_file(run_dir):
    names = {p.name for p in run_dir.iterdir()}
    assert {
        "requests.jsonl",
        "summary.json",
        "report.md",
        "aggregate_tok_s.png",
        "decode_tok_s.png",
        "ttft.png",
    } <= names
    for png in ("aggregate_tok_s.png", "decode_tok_s.png", "ttft.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    for heading in ("Single-stream (c=1), by category", "Aggregate output tok/s vs concurrency", "TTFT vs concurrency",
                    "Long-context tiers", "0 of 9 requests failed"):  # fmt: skip
        assert heading in report
    assert "| Coding |" in report and "| Math |" in report


def test_requests_are_sane(run_dir):
    raw = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    assert len(raw) == 2 * 2 * 2 + 1  # 2 categories x 2 levels x 2 prompts, and one long-context prompt
    for r in raw:
        assert r["error"] is None and r["usage_reported"]
        assert 0 < r["output_tokens"] <= MAX_TOKENS
        assert 0 < r["ttft_s"] <= r["e2e_s"]
        assert r["prompt_tokens"] > 10
        if r["output_tokens"] > 1:
            assert r["tpot_s"] == pytest.approx((r["e2e_s"] - r["ttft_s"]) / (r["output_tokens"] - 1))
    long = [r for r in raw if r["kind"] == "long_context"]
    assert long[0]["prompt_tokens"] == pytest.approx(300, rel=0.1)  # padded by the model's own tokenizer


def test_summary_agrees_with_the_raw_requests(run_dir):
    summary = json.loads((run_dir / "summary.json").read_text())
    raw = [json.loads(line) for line in (run_dir / "requests.jsonl").read_text().splitlines()]
    # fp4serve has /tokenize, which beats a local tokenizer
    assert summary["meta"]["token_count_method"] == "server /tokenize (vLLM shape)"
    levels = [lv for lv in summary["levels"] if lv["kind"] == "category"]
    assert [(lv["category"], lv["concurrency"]) for lv in levels] == [
        ("coding", 1),
        ("coding", 2),
        ("math", 1),
        ("math", 2),
    ]
    for lv in levels:
        mine = [
            r
            for r in raw
            if (r["category"], r["concurrency"], r["kind"]) == (lv["category"], lv["concurrency"], "category")
        ]
        wall = max(r["start_s"] + r["e2e_s"] for r in mine) - min(r["start_s"] for r in mine)
        assert lv["errors"] == 0 and lv["output_tokens"] == sum(r["output_tokens"] for r in mine)
        assert lv["output_tok_s"] == pytest.approx(lv["output_tokens"] / wall)
        assert lv["ttft_s"]["max"] == max(r["ttft_s"] for r in mine)
        # No speculative decoding here: no counters at all, or counters that never moved. Never "0%".
        assert lv["spec_decode"]["status"] in ("not reported", "no drafts")


def test_a_server_that_cannot_start_is_a_clear_error(tmp_path):
    log = tmp_path / "server.log"
    expected = "exited with code 2 before it was ready(.|\n)*--no-such-flag: fp4serve does not support vLLM's --no-such-flag"
    with pytest.raises(BenchError, match=expected), LocalServer("--no-such-flag", log_path=log):
        pass
    with pytest.raises(BenchError, match="must not set --host or --port"):
        LocalServer("--port 9000")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-prompts", "0"], "--num-prompts must be at least 1"),
        (["--concurrency", "1,0"], "--concurrency must be a comma list of positive integers"),
        (["--temperature", "hot"], "--temperature must be a comma list of numbers"),
        (["--max-tokens", "0"], "--max-tokens must be at least 1"),
    ],
)
def test_bad_flags_are_refused_before_anything_starts(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "serve", "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
