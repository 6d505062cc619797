"""The soak, short: 20 s of multi-turn traffic with aborts and disconnects against `fp4serve serve`
(a subprocess) on SmolLM2 with n-gram drafting and prefix caching. Nothing fails, nothing leaks,
shared prefixes hit, drafts are verified, and T=0 turns replayed alone give the replies they gave
under load. In float32: in bf16 a reply depends on the batch it ran in (the fused few-token CPU
step keeps the residual in fp32, the batched torch path in bf16), so a replay alone may differ;
docs/benchmarks.md records that case."""

from __future__ import annotations

import asyncio

from fp4serve.bench.local_server import LocalServer
from fp4serve.bench.soak import SoakConfig, format_report, run_soak

NGRAM = '--speculative-config \'{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}\''


def test_short_soak(smollm2_path, tmp_path):
    config = SoakConfig(duration_s=20, concurrency=16, window_s=10, abort_fraction=0.15, disconnect_fraction=0.1,
                        replay_samples=6, seed=3)  # fmt: skip
    serve = f"{smollm2_path} --dtype float32 --enable-prefix-caching --max-model-len 4096 {NGRAM}"
    with LocalServer(serve, log_path=tmp_path / "server.log") as server:
        report = asyncio.run(run_soak(server.url, None, config, server_pid=server.pid))
    text = format_report(report, "short soak")
    # Each client's turns are drawn from its own seeded generator, so the 16 first turns (which all
    # start) are the same every run; with seed 3 they include an abort and a disconnect.
    assert report.requests >= 16 and report.aborts and report.disconnects, text
    assert report.errors == [] and report.server_errors == 0, text
    assert not report.leaked and report.idle["running"] == 0 and report.idle["kv_usage"] == 0, text
    assert report.peak_rss_bytes and report.peak_rss_bytes > 2**20, text
    assert report.replayed and report.replay_mismatches == [], text
    assert any(w.hit_rate for w in report.windows), text  # shared system prompts and earlier turns hit
    assert any(w.acceptance_rate is not None for w in report.windows), text  # drafting ran
