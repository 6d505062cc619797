"""GET /metrics: the engine's state and counters in Prometheus text format, under vLLM's metric
names (prefix `vllm:`), so dashboards and benchmark tools written for vLLM read fp4serve unchanged.

Everything is read at scrape time (a collector, no background updates); each app has its own
registry, so several apps in one process (tests, the benchmark client) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fp4serve.engine.engine import LLMEngine
from fp4serve.engine.stats import Histogram

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def describe(self):
        return []  # no fixed description: collect() is only called at scrape time

    def collect(self):
        engine, names, values = self.engine, list(self.labels), list(self.labels.values())
        scheduler, pool = engine.scheduler, engine.block_pool
        stats = engine.stats.snapshot()

        def gauge(name, doc, value):
            family = GaugeMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        def counter(name, doc, value):
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            return family

        yield gauge("vllm:num_requests_running", "Requests in the running batch.", len(scheduler.running))
        yield gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.", len(scheduler.waiting))
        yield gauge("vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", pool.usage())
        yield counter("vllm:num_preemptions", "Preemptions (by recompute).", scheduler.num_preemptions)
        yield counter("vllm:prompt_tokens", "Prompt tokens of requests that produced a token.", stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Generated tokens.", stats.generation_tokens)
        # Prefix-cache lookups, in tokens (the pool counts whole blocks).
        yield counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      pool.queries * pool.block_size)  # fmt: skip
        yield counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", pool.hits * pool.block_size)

        finished = CounterMetricFamily("vllm:request_success", "Finished requests by finish reason.",
                                       labels=names + ["finished_reason"])  # fmt: skip
        for reason in ("stop", "length", "abort"):
            finished.add_metric(values + [reason], stats.finished.get(reason, 0))
        yield finished

        yield self._histogram("vllm:time_to_first_token_seconds", "Time to first token.", stats.time_to_first_token)
        yield self._histogram("vllm:inter_token_latency_seconds", "Time between steps that gave a request tokens.",
                              stats.inter_token_latency)  # fmt: skip
        yield self._histogram("vllm:e2e_request_latency_seconds", "Arrival to finish.", stats.e2e_latency)
        yield from self._spec_decoding()

    def _histogram(self, name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip(list(histogram.bounds) + [float("inf")], histogram.counts):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
        family = HistogramMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), cumulative, histogram.sum)
        return family

    def _spec_decoding(self):
        spec = self.engine.spec_stats
        if spec is None:  # vLLM exports these only with speculative decoding on
            return
        names, values = list(self.labels), list(self.labels.values())
        for name, doc, value in (
            ("vllm:spec_decode_num_drafts", "Verification steps that carried drafts.", spec.num_drafts),
            ("vllm:spec_decode_num_draft_tokens", "Draft tokens proposed.", spec.num_draft_tokens),
            ("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", spec.num_accepted_tokens),
        ):
            family = CounterMetricFamily(name, doc, labels=names)
            family.add_metric(values, value)
            yield family
        per_position = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                           "Accepted draft tokens by position in the draft.",
                                           labels=names + ["position"])  # fmt: skip
        for position, value in enumerate(list(spec.accepted_per_position)):
            per_position.add_metric(values + [str(position)], value)
        yield per_position


def metrics_registry(engine: LLMEngine, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
