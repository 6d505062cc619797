"""The acceptance watchdog (spec_decode/acceptance_watch.py).

Synthetic verifications: a steady rate never warns; a sudden decay warns once, however long it
lasts; recovery re-arms it, so the next decay warns again; a decay that comes with a change of
request mix (prompt length, greedy share) or from a handful of requests does not warn; the gauges
are the exact rates of the window and of what came before it. Then a real engine (n-gram drafting
on a tiny Llama) whose drafts turn to garbage: the gauges appear in LLM.get_metrics() and on
/metrics, and the log warns once.
"""

from __future__ import annotations

import functools
import logging
import math
import random

import pytest
from conftest import make_checkpoint
from prometheus_client.parser import text_string_to_metric_families
from transformers import LlamaConfig

import fp4serve.engine.engine as engine_module
from fp4serve import LLM, SamplingParams
from fp4serve import metric_names as names
from fp4serve.server.metrics import metrics_registry, render
from fp4serve.spec_decode.acceptance_watch import AcceptanceWatch
from fp4serve.spec_decode.metrics import Gauge

LOGGER = "fp4serve.spec_decode.acceptance_watch"
FELL = "draft acceptance for {} fell to"
K = 4  # draft tokens per verification


def feed(watch: AcceptanceWatch, rate: float, draft_tokens: int, requests: int = 16, prompt_len: int = 100,
         greedy: bool = True) -> None:  # fmt: skip
    """draft_tokens in verifications of K tokens, round robin over `requests` requests, accepted so
    that the running share is `rate` to within one token at every point."""
    accepted_so_far = 0
    for i in range(draft_tokens // K):
        accepted = round((i + 1) * K * rate) - accepted_so_far
        accepted_so_far += accepted
        watch.observe(f"r{i % requests}", K, accepted, prompt_len, greedy)


def warnings(caplog, method: str = "mtp") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(FELL.format(method))]


@pytest.fixture(autouse=True)
def _log_level(caplog):
    caplog.set_level(logging.INFO, logger=LOGGER)


def test_steady_acceptance_never_warns(caplog):
    watch = AcceptanceWatch("mtp")
    for rate in (0.45, 0.40, 0.50, 0.45):  # ordinary wobble
        feed(watch, rate, 6000)
    assert warnings(caplog) == []
    recent, running = watch.rates()
    assert recent == pytest.approx(0.45, abs=0.005) and running == pytest.approx(0.45, abs=0.01)


def test_gauges_are_the_rates_of_the_window_and_of_what_came_before():
    watch = AcceptanceWatch("mtp")
    assert all(math.isnan(r) for r in watch.rates())  # no draft token yet: no value
    feed(watch, 0.45, 1000)
    recent, running = watch.rates()
    assert recent == pytest.approx(0.45) and math.isnan(running)  # nothing has left the window yet
    feed(watch, 0.45, 4000)
    feed(watch, 1.0, 1000)
    # the window: the last 2000 draft tokens (1000 at 0.45, 1000 at 1.0); before it, 4000 at 0.45
    assert watch.rates() == (pytest.approx(0.725), pytest.approx(0.45))


def test_a_sudden_decay_warns_once(caplog):
    watch = AcceptanceWatch("mtp")
    feed(watch, 0.45, 10000)
    feed(watch, 0.03, 20000)  # stays low far longer than the window
    [message] = warnings(caplog)
    assert "from a running 45.0%" in message and "over the last 2000 draft tokens" in message
    assert "unchanged request mix" in message and "docs/speculative.md" in message
    assert watch.rates()[0] == pytest.approx(0.03, abs=0.005)


def test_recovery_rearms_the_warning(caplog):
    watch = AcceptanceWatch("dflash")
    feed(watch, 0.45, 10000)
    feed(watch, 0.0, 3000)
    assert len(warnings(caplog, "dflash")) == 1
    feed(watch, 0.45, 3000)
    assert any("armed again" in r.getMessage() for r in caplog.records)
    feed(watch, 0.0, 3000)
    assert len(warnings(caplog, "dflash")) == 2


def test_a_rate_hovering_at_the_threshold_warns_once(caplog):
    watch = AcceptanceWatch("mtp")
    feed(watch, 0.45, 10000)
    for _ in range(10):  # in and out of "below half", never back to 3/4 of the running level
        feed(watch, 0.15, 2000)
        feed(watch, 0.28, 2000)
    assert len(warnings(caplog)) == 1


@pytest.mark.parametrize(
    "change",
    [
        {"prompt_len": 1000},  # 10x longer prompts
        {"prompt_len": 20},  # 5x shorter
        {"greedy": False},  # all sampled where all were greedy
    ],
)
def test_a_decay_with_a_new_request_mix_does_not_warn(caplog, change):
    watch = AcceptanceWatch("ngram")
    feed(watch, 0.45, 10000)
    feed(watch, 0.03, 4000, **change)
    assert warnings(caplog, "ngram") == []
    feed(watch, 0.03, 4000)  # the same decay under the old mix does
    assert len(warnings(caplog, "ngram")) == 1


def test_a_window_of_a_few_requests_does_not_warn(caplog):
    watch = AcceptanceWatch("ngram")  # low concurrency: 3 requests at a time, one hard prompt can sink the rate
    feed(watch, 0.45, 10000, requests=3)
    feed(watch, 0.03, 4000, requests=3)
    assert warnings(caplog, "ngram") == []


def test_a_drafter_that_rarely_hits_is_not_called_broken(caplog):
    watch = AcceptanceWatch("ngram")
    feed(watch, 0.08, 10000)
    feed(watch, 0.01, 4000)  # below half, but under 10 points of difference
    assert warnings(caplog, "ngram") == []


def test_no_warning_before_the_running_level_holds_enough_tokens(caplog):
    watch = AcceptanceWatch("mtp")
    feed(watch, 0.45, 2400)
    feed(watch, 0.0, 1500)  # the window at 11%, but only 1900 draft tokens before it
    assert warnings(caplog) == []
    feed(watch, 0.0, 100)  # 2000 before it
    assert len(warnings(caplog)) == 1


# ---- a real engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    path = tmp_path_factory.mktemp("watch-llama")
    make_checkpoint(path, LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                      eos_token_id=299, bos_token_id=None, tie_word_embeddings=True))  # fmt: skip
    return path


def gauges(llm: LLM) -> dict[str, float]:
    """The acceptance gauges of LLM.get_metrics() and of /metrics, keyed by name; they must agree."""
    offline = {m.name: m.value for m in llm.get_metrics() if isinstance(m, Gauge) and m.labels == {"method": "ngram"}}
    scraped = {
        sample.name: sample.value
        for family in text_string_to_metric_families(render(metrics_registry(llm.engine, "tiny")).decode())
        for sample in family.samples
        if sample.name.startswith("fp4serve:") and sample.labels == {"model_name": "tiny", "method": "ngram"}
    }
    assert scraped == offline
    return offline


def test_engine_gauges_and_a_warning_when_drafts_turn_to_garbage(tiny_llama, monkeypatch, caplog):
    # A small window, so that a few batches of a tiny model fill it.
    small = functools.partial(AcceptanceWatch, window_draft_tokens=60, min_running_draft_tokens=60, min_requests=4)
    monkeypatch.setattr(engine_module, "AcceptanceWatch", small)
    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=256, kv_cache_memory="8MiB",
              speculative_config={"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1,
                                  "prompt_lookup_max": 3})  # fmt: skip
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    def batch():  # the same mix every time: 8 greedy requests of 12-token prompts
        return [{"prompt_token_ids": [rng.randrange(290) for _ in range(12)]} for _ in range(8)]

    llm.generate(batch(), params)
    llm.generate(batch(), params)
    healthy = gauges(llm)
    # this model loops, so prompt lookup mostly hits
    assert healthy[names.SPEC_DECODE_ACCEPTANCE_RATE_RECENT] > 0.5
    assert healthy[names.SPEC_DECODE_ACCEPTANCE_RATE_RUNNING] > 0.5
    assert warnings(caplog, "ngram") == []

    real = llm.engine.proposer.propose
    # each draft token shifted by one: wrong wherever prompt lookup was right
    garbage = lambda *args: [[(t + 1) % 300 for t in draft] for draft in real(*args)]
    monkeypatch.setattr(llm.engine.proposer, "propose", garbage)
    llm.generate(batch(), params)
    llm.generate(batch(), params)
    broken = gauges(llm)
    assert broken[names.SPEC_DECODE_ACCEPTANCE_RATE_RECENT] < 0.2
    [message] = warnings(caplog, "ngram")
    assert "over the last 6" in message  # the window: 60 draft tokens or a verification more
