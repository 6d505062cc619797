"""An endpoint that errs, drops streams or skips [DONE] is measured as errors with their messages,
the run goes on, and the report counts them; timings and tokens of good requests are sane."""

from __future__ import annotations

import asyncio
import json

import pytest
from fake_openai import FIRST_TOKEN_DELAY, TOKEN_GAP, TOKENS, FakeServer

from fp4serve.bench.report import markdown, write_results
from fp4serve.bench.sweep import SweepConfig, run_sweep
from fp4serve.bench.workloads import Prompt

BEHAVIOURS = ["ok", "http500", "drop", "no done", "error event"]


@pytest.fixture(scope="module")
def fake():
    with FakeServer() as server:
        yield server


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_errors_are_counted_with_messages(fake, tmp_path, chat):
    workload = {b.replace(" ", "_"): [Prompt(b.replace(" ", "_"), b)] for b in BEHAVIOURS}
    config = SweepConfig(
        base_url=fake.url, model="fake-model", chat=chat, concurrency=(1, 2), num_prompts=2, warmup=0, progress=False
    )
    levels = asyncio.run(run_sweep(config, workload))
    by_key = {(lv.category, lv.concurrency): lv.to_dict() for lv in levels}
    assert len(levels) == 10

    for c in (1, 2):
        ok = by_key[("ok", c)]
        assert (ok["requests"], ok["errors"]) == (2, 0)
        assert ok["output_tokens"] == 2 * len(TOKENS)  # from usage
        assert ok["ttft_s"]["min"] >= FIRST_TOKEN_DELAY * 0.9  # the role-only chunk is not a token
        assert ok["itl_s"]["min"] >= TOKEN_GAP * 0.5 and ok["e2e_s"]["min"] >= ok["ttft_s"]["min"]
        # The fake's /metrics drafted for every good request: vLLM's meanings give 3/6 and 1 + 3/2.
        assert ok["spec_decode"]["status"] == "ok"
        assert ok["spec_decode"]["acceptance_rate"] == pytest.approx(0.5)
        assert ok["spec_decode"]["mean_acceptance_length"] == pytest.approx(2.5)
        assert ok["spec_decode"]["per_position"] == pytest.approx([1.0, 0.5, 0.0])

        expected = {
            "http500": "HTTP 500: the engine fell over",
            "drop": "RemoteProtocolError",
            "no_done": "stream ended before data: [DONE]",
            "error_event": "stream error: out of KV blocks",
        }
        for category, message in expected.items():
            level = by_key[(category, c)]
            assert (level["requests"], level["completed"], level["errors"]) == (2, 0, 2), category
            assert len(level["error_messages"]) == 1 and message in level["error_messages"][0], level["error_messages"]
            assert level["output_tokens"] == 0 and level["output_tok_s"] == 0
            assert level["spec_decode"]["status"] == "no drafts"  # counters exist; these requests drafted nothing

    meta = {"label": "fake", "base_url": fake.url, "server": "external", "model": "fake-model", "endpoint": "chat",
            "max_tokens": 128, "workload": "test", "level_size": "2 requests", "warmup": 0, "date": "today",
            "token_count_method": "not needed", "command": "test"}  # fmt: skip
    summary = write_results(tmp_path, meta, levels)
    report = markdown(summary, charts=[])
    assert "16 of 20 requests failed (80.0%)" in report
    assert "HTTP 500: the engine fell over" in report
    raw = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len(raw) == 20 and sum(r["error"] is not None for r in raw) == 16


def test_unreachable_server_is_an_error_per_request(tmp_path):
    config = SweepConfig(
        base_url="http://127.0.0.1:9/v1", model="m", concurrency=(1,), num_prompts=2, warmup=1, progress=False
    )
    levels = asyncio.run(run_sweep(config, {"coding": [Prompt("coding", "hi")]}))
    summary = levels[0].to_dict()
    assert summary["errors"] == 2 and "ConnectError" in summary["error_messages"][0]
    assert summary["spec_decode"]["status"] == "not reported"


def test_duration_mode_keeps_sending_until_time_is_up(fake):
    config = SweepConfig(
        base_url=fake.url, model="fake-model", concurrency=(3,), duration=0.4, warmup=0, progress=False
    )
    (level,) = asyncio.run(run_sweep(config, {"ok": [Prompt("ok", "ok")]}))
    summary = level.to_dict()
    # Each request takes ~0.13 s, so 3 streams fill 0.4 s with 2-4 waves; all started ones finish.
    assert 6 <= summary["requests"] <= 15 and summary["errors"] == 0
    assert max(r.start_s for r in level.results) < 0.4 + 0.05
