"""Prometheus metrics of a server: the scheduler's gauges read at scrape time, its timings as histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from haplo.runtime.scheduler import Observer, Scheduler

TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAUGES = {
    "queue_depth": "requests waiting for admission",
    "running_batch": "understanding requests in the running decode batch",
    "running_video": "video jobs in the running DDIM batch",
    "kv_cache_bytes": "bytes of KV cache the running batches hold",
    "prefix_cache_bytes": "bytes of KV cache kept for prompt prefixes (chat history, shared media)",
}


class _SchedulerGauges:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler

    def collect(self):
        stats = self.scheduler.stats()
        for name, doc in GAUGES.items():
            yield GaugeMetricFamily(f"haplo_{name}", doc, value=stats[name])
        cache = self.scheduler.prefix_cache
        if cache is not None:
            lookups = CounterMetricFamily("haplo_prefix_cache_lookups", "kept-prefix lookups", labels=["result"])
            lookups.add_metric(["hit"], cache.hits)
            lookups.add_metric(["miss"], cache.misses)
            yield lookups
            doc = "prompt tokens prefilled from kept prefixes"
            yield CounterMetricFamily("haplo_prefix_cache_reused_tokens", doc, value=cache.reused_tokens)


class _MediaCacheMetrics:
    def __init__(self, cache) -> None:
        self.cache = cache

    def collect(self):
        c = self.cache
        yield GaugeMetricFamily("haplo_media_cache_bytes", "bytes of decoded media kept by content", value=c.bytes)
        lookups = CounterMetricFamily("haplo_media_cache_lookups", "decoded-media lookups", labels=["result"])
        lookups.add_metric(["hit"], c.hits)
        lookups.add_metric(["miss"], c.misses)
        yield lookups


class Metrics(Observer):
    """The scheduler's observer and the `/metrics` page, on a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.histograms = {
            "ttft": Histogram(
                "haplo_time_to_first_token_seconds", "submit to first token", buckets=TOKEN_BUCKETS, registry=r
            ),
            "tpot": Histogram(
                "haplo_time_per_output_token_seconds", "between two tokens", buckets=TOKEN_BUCKETS, registry=r
            ),
            "ddim_step": Histogram(
                "haplo_ddim_step_seconds", "one batched guided DDIM step", buckets=STEP_BUCKETS, registry=r
            ),
        }
        self.requests = Counter("haplo_requests", "requests by kind and outcome", ["kind", "status"], registry=r)

    def watch(self, scheduler: Scheduler) -> None:
        self.registry.register(_SchedulerGauges(scheduler))

    def watch_media(self, cache) -> None:
        """Report a `haplo.serving.media.MediaCache`'s size, hits and misses."""
        self.registry.register(_MediaCacheMetrics(cache))

    def observe(self, metric: str, seconds: float) -> None:
        self.histograms[metric].observe(seconds)

    def finished(self, kind: str, status: str) -> None:
        self.requests.labels(kind, status).inc()

    def page(self) -> bytes:
        return generate_latest(self.registry)
