"""The /metrics scraper on a fixture in vLLM's Prometheus exposition format."""

from __future__ import annotations

import pytest

from fp4serve.bench.spec_metrics import acceptance, counter_delta, parse_samples, scrape, spec_counters

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="qwen36"} 2.0
# HELP vllm:spec_decode_num_drafts_total Number of spec decoding drafts.
# TYPE vllm:spec_decode_num_drafts_total counter
vllm:spec_decode_num_drafts_total{engine="0",model_name="qwen36"} 100.0
vllm:spec_decode_num_drafts_total{engine="1",model_name="qwen36"} 20.0
# HELP vllm:spec_decode_num_drafts_created Creation time.
# TYPE vllm:spec_decode_num_drafts_created gauge
vllm:spec_decode_num_drafts_created{engine="0",model_name="qwen36"} 1.7e+09
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="qwen36"} 300.0
vllm:spec_decode_num_draft_tokens_total{engine="1",model_name="qwen36"} 60.0
# TYPE vllm:spec_decode_num_accepted_tokens_total counter
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="qwen36"} 150.0
vllm:spec_decode_num_accepted_tokens_total{engine="1",model_name="qwen36"} 30.0
# TYPE vllm:spec_decode_num_accepted_tokens_per_pos_total counter
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen36",position="0"} 80.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen36",position="1"} 45.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="qwen36",position="2"} 25.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen36",position="0"} 16.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen36",position="1"} 9.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="1",model_name="qwen36",position="2"} 5.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="a \\"quoted\\", name"} 7.0
"""


def test_parse_samples_reads_labels_and_escapes():
    samples = parse_samples(VLLM_METRICS)
    assert ("vllm:num_requests_running", {"engine": "0", "model_name": "qwen36"}, 2.0) in samples
    name, labels, value = samples[-1]
    assert name == "vllm:e2e_request_latency_seconds_bucket" and value == 7.0
    assert labels["le"] == "+Inf" and labels["model_name"] == 'a \\"quoted\\", name'


def test_counters_sum_over_engines_and_ignore_created_samples():
    counters = spec_counters(VLLM_METRICS)
    assert counters["num_drafts"] == 120.0  # the _created gauge is not a count
    assert counters["num_draft_tokens"] == 360.0
    assert counters["num_accepted_tokens"] == 180.0
    assert counters["accepted_per_pos"] == {0: 96.0, 1: 54.0, 2: 30.0}


def test_acceptance_from_a_delta_uses_vllm_meanings():
    before = spec_counters(VLLM_METRICS)
    after = spec_counters(
        VLLM_METRICS.replace("} 100.0", "} 140.0")  # drafts: +40 on engine 0
        .replace("} 300.0", "} 420.0")  # draft tokens: +120
        .replace("} 150.0", "} 210.0")  # accepted: +60
        .replace('position="0"} 80.0', 'position="0"} 110.0')
        .replace('position="1"} 45.0', 'position="1"} 65.0')
        .replace('position="2"} 25.0', 'position="2"} 35.0')
    )
    delta = counter_delta(before, after)
    assert (delta["num_drafts"], delta["num_draft_tokens"], delta["num_accepted_tokens"]) == (40.0, 120.0, 60.0)
    result = acceptance(delta)
    assert result["status"] == "ok"
    assert result["acceptance_rate"] == pytest.approx(60 / 120)
    assert result["mean_acceptance_length"] == pytest.approx(1 + 60 / 40)
    assert result["per_position"] == pytest.approx([30 / 40, 20 / 40, 10 / 40])


def test_missing_counters_are_not_reported_never_zero():
    plain = "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 0.0\n"
    counters = spec_counters(plain)
    assert counters == {
        "num_drafts": None,
        "num_draft_tokens": None,
        "num_accepted_tokens": None,
        "accepted_per_pos": None,
    }
    assert acceptance(counter_delta(counters, counters))["status"] == "not reported"
    assert acceptance(counter_delta(None, None))["acceptance_rate"] is None  # no /metrics at all
    # Counters present but nothing drafted in the level: a different answer from "not reported".
    same = spec_counters(VLLM_METRICS)
    assert acceptance(counter_delta(same, same))["status"] == "no drafts"


def test_scrape_of_a_server_without_metrics_is_none():
    import httpx

    def handler(request):
        return httpx.Response(404, text="not found") if request.url.path == "/metrics" else httpx.Response(500)

    with httpx.Client(transport=httpx.MockTransport(handler)) as client:
        assert scrape(client, "http://server/metrics") is None
    with httpx.Client(transport=httpx.MockTransport(lambda r: httpx.Response(200, text=VLLM_METRICS))) as client:
        assert scrape(client, "http://server/metrics")["num_drafts"] == 120.0
