"""GET /metrics: the engine's state and counters in Prometheus text format, under vLLM's metric
names (fp4serve/metric_names.py), so dashboards and benchmark tools written for vLLM read fp4serve
unchanged.

Everything is read at scrape time (a collector, no background updates); each app has its own
registry, so several apps in one process (tests, the benchmark client) do not collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from fp4serve import metric_names as names
from fp4serve.engine.engine import LLMEngine
from fp4serve.engine.stats import Histogram
from fp4serve.spec_decode.acceptance_watch import WINDOW_DRAFT_TOKENS
from fp4serve.spec_decode.metrics import Gauge, Vector, spec_decode_metrics

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# HELP lines of the metrics that spec_decode_metrics() names and fills (LLM.get_metrics() has none).
SPEC_DECODE_HELP = {
    names.SPEC_DECODE_NUM_DRAFTS: "Verification steps that carried drafts.",
    names.SPEC_DECODE_NUM_DRAFT_TOKENS: "Draft tokens proposed.",
    names.SPEC_DECODE_NUM_ACCEPTED_TOKENS: "Draft tokens accepted.",
    names.SPEC_DECODE_NUM_ACCEPTED_TOKENS_PER_POS: "Accepted draft tokens by position in the draft.",
    names.SPEC_DECODE_ACCEPTANCE_RATE_RECENT: f"Accepted / draft tokens over the last {WINDOW_DRAFT_TOKENS} draft tokens.",
    names.SPEC_DECODE_ACCEPTANCE_RATE_RUNNING: "Accepted / draft tokens since start, before the recent window.",
}


class EngineCollector:
    def __init__(self, engine: LLMEngine, model_name: str):
        self.engine = engine
        self.labels = {"model_name": model_name}

    def describe(self):
        return []  # no fixed description: collect() is only called at scrape time

    def collect(self):
        scheduler, pool = self.engine.scheduler, self.engine.block_pool
        stats = self.engine.stats.snapshot()
        yield self._gauge(names.NUM_REQUESTS_RUNNING, "Requests in the running batch.", len(scheduler.running))
        yield self._gauge(names.NUM_REQUESTS_WAITING, "Requests waiting to be scheduled.", len(scheduler.waiting))
        yield self._gauge(names.KV_CACHE_USAGE, "Fraction of KV-cache blocks in use (1 = full).", pool.usage())
        yield self._counter(names.NUM_PREEMPTIONS, "Preemptions (by recompute).", scheduler.num_preemptions)
        yield self._counter(names.PROMPT_TOKENS, "Prompt tokens of requests that produced a token.",
                            stats.prompt_tokens)  # fmt: skip
        yield self._counter(names.GENERATION_TOKENS, "Generated tokens.", stats.generation_tokens)
        # Prefix-cache lookups, in tokens (the pool counts whole blocks).
        yield self._counter(names.PREFIX_CACHE_QUERIES, "Prompt tokens looked up in the prefix cache.",
                            pool.queries * pool.block_size)  # fmt: skip
        yield self._counter(names.PREFIX_CACHE_HITS, "Prompt tokens found in the prefix cache.",
                            pool.hits * pool.block_size)  # fmt: skip
        finished = {reason: stats.finished.get(reason, 0) for reason in names.FINISHED_REASONS}
        yield self._labelled_counter(names.REQUEST_SUCCESS, "Finished requests by finish reason.", "finished_reason",
                                     finished)  # fmt: skip
        yield self._histogram(names.TIME_TO_FIRST_TOKEN, "Time to first token.", stats.time_to_first_token)
        yield self._histogram(names.INTER_TOKEN_LATENCY, "Time between steps that gave a request tokens.",
                              stats.inter_token_latency)  # fmt: skip
        yield self._histogram(names.E2E_REQUEST_LATENCY, "Arrival to finish.", stats.e2e_latency)
        yield from self._spec_decoding()

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _labelled_gauge(self, name: str, doc: str, labels: dict[str, str], value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(self.labels) + list(labels))
        family.add_metric(list(self.labels.values()) + list(labels.values()), value)
        return family

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), value)
        return family

    def _labelled_counter(self, name: str, doc: str, label: str, values: dict) -> CounterMetricFamily:
        """One sample per value of `label`, besides the model name."""
        family = CounterMetricFamily(name, doc, labels=list(self.labels) + [label])
        for label_value, value in values.items():
            family.add_metric(list(self.labels.values()) + [str(label_value)], value)
        return family

    def _histogram(self, name: str, doc: str, histogram: Histogram) -> HistogramMetricFamily:
        cumulative, running = [], 0
        for bound, count in zip(list(histogram.bounds) + [float("inf")], histogram.counts):
            running += count
            cumulative.append(("+Inf" if bound == float("inf") else str(bound), running))
        family = HistogramMetricFamily(name, doc, labels=list(self.labels))
        family.add_metric(list(self.labels.values()), cumulative, histogram.sum)
        return family

    def _spec_decoding(self):
        engine = self.engine
        if engine.spec_stats is None:  # vLLM exports these only with speculative decoding on
            return
        for metric in spec_decode_metrics(engine.spec_stats, engine.acceptance_watch):
            doc = SPEC_DECODE_HELP[metric.name]
            if isinstance(metric, Gauge):
                yield self._labelled_gauge(metric.name, doc, metric.labels, metric.value)
            elif isinstance(metric, Vector):
                yield self._labelled_counter(metric.name, doc, "position", dict(enumerate(metric.values)))
            else:
                yield self._counter(metric.name, doc, metric.value)


def metrics_registry(engine: LLMEngine, model_name: str) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(engine, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
