"""vLLM's metric names, written once: fp4serve exports them (server/metrics.py, LLM.get_metrics()) so
that tools built for vLLM read fp4serve unchanged, and the benchmark reads them back from any server,
vLLM included (bench/spec_metrics.py). A few gauges vLLM lacks are fp4serve's own, prefixed `fp4serve:`.

These are the base names, as LLM.get_metrics() reports them and as prometheus_client's counter
families take them; the Prometheus text format shows a counter's samples under `exposed_counter()`.
"""

# Gauges
NUM_REQUESTS_RUNNING = "vllm:num_requests_running"  # requests in the running batch
NUM_REQUESTS_WAITING = "vllm:num_requests_waiting"  # requests waiting to be scheduled
KV_CACHE_USAGE = "vllm:kv_cache_usage_perc"  # fraction of KV-cache blocks in use (1 = full)

# Counters
NUM_PREEMPTIONS = "vllm:num_preemptions"  # preemptions (by recompute; a request may count more than once)
PROMPT_TOKENS = "vllm:prompt_tokens"  # prompt tokens of requests that produced a token
GENERATION_TOKENS = "vllm:generation_tokens"  # generated tokens
PREFIX_CACHE_QUERIES = "vllm:prefix_cache_queries"  # prompt tokens looked up in the prefix cache
PREFIX_CACHE_HITS = "vllm:prefix_cache_hits"  # prompt tokens found in the prefix cache
REQUEST_SUCCESS = "vllm:request_success"  # finished requests, label finished_reason
# Its finished_reason values, vLLM's FinishReason strings ("error": the engine failed on that request).
FINISHED_REASONS = ("stop", "length", "abort", "error")

# Histograms (seconds)
TIME_TO_FIRST_TOKEN = "vllm:time_to_first_token_seconds"  # arrival to first token
INTER_TOKEN_LATENCY = "vllm:inter_token_latency_seconds"  # between steps that gave a request tokens
E2E_REQUEST_LATENCY = "vllm:e2e_request_latency_seconds"  # arrival to finish

# Speculative-decoding counters (exported only while drafting is on)
SPEC_DECODE_NUM_DRAFTS = "vllm:spec_decode_num_drafts"  # verification steps that carried drafts
SPEC_DECODE_NUM_DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"  # draft tokens proposed
SPEC_DECODE_NUM_ACCEPTED_TOKENS = "vllm:spec_decode_num_accepted_tokens"  # draft tokens accepted
SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"  # accepted, label position

# fp4serve's own gauges (vLLM has none for this), in vLLM's style under the fp4serve: prefix; exported only
# while drafting is on, label method (spec_decode/acceptance_watch.py). NaN while a window holds no draft token.
# accepted / draft tokens over the latest verifications holding 2000 draft tokens
SPEC_DECODE_ACCEPTANCE_RATE_RECENT = "fp4serve:spec_decode_acceptance_rate_recent"
# accepted / draft tokens over every verification since start that has left the recent window
SPEC_DECODE_ACCEPTANCE_RATE_RUNNING = "fp4serve:spec_decode_acceptance_rate_running"


def exposed_counter(name: str) -> str:
    """A counter's sample name on /metrics: prometheus_client (vLLM's too) appends `_total`."""
    return name + "_total"
