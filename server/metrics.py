"""Prometheus metrics of one server instance (its own registry, so tests can build many apps)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes etc. of the API server process
        self.requests = Counter("iro_requests_total", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r)
        self.latency = Histogram("iro_request_latency_seconds", "HTTP request latency", ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("iro_requests_in_flight", "HTTP requests being served", registry=r)
        self.engine_in_flight = Gauge("iro_engine_requests_in_flight", "Requests inside the vLLM engine", registry=r)
        self.prompt_tokens = Counter("iro_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("iro_generation_tokens_total", "Tokens generated (all candidates)", registry=r)
        self.rejected = Counter("iro_requests_rejected_total", "Requests refused because the queue was full", registry=r)
        # guided decoding
        self.chunks = Counter("iro_guided_chunks_total", "Chunk sampling calls made by guided searches", registry=r)
        self.candidates_scored = Counter("iro_guided_candidates_scored_total", "Candidates scored by value chains", registry=r)
        self.scorer_batch = Histogram("iro_scorer_batch_size", "Candidates per scorer forward pass",
                                      buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.scorer_latency = Histogram("iro_scorer_batch_seconds", "Scorer forward pass latency", buckets=LATENCY_BUCKETS, registry=r)
        self.value_version = Gauge("iro_value_version", "Serving version of each loaded value", ["value"], registry=r)
        self.engine_value_fallbacks = Counter(
            "iro_engine_value_fallbacks_total",
            "Search steps whose engine values were not finite, so the scorer valued the candidates", registry=r)
        self.value_refused = Counter("iro_value_refused_total", "Value versions refused at load", ["value"], registry=r)
        self.value_refused_memory = Counter("iro_value_refused_memory_total",
                                            "Value versions refused because they do not fit the values' memory budget",
                                            ["value"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Families:
    """A collector of fixed metric families (what `merge_replicas` renders)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_replicas(texts: Mapping[str, bytes | str], label: str = "replica") -> bytes:
    """Several replicas' expositions (replica id -> `Metrics.render()` text) as one, each sample
    labelled with its replica: what `GET /metrics` answers through Ray Serve's proxy, so a scrape
    of the one endpoint sees every replica instead of whichever one the proxy picked.

    >>> a, b = Metrics(), Metrics(); a.rejected.inc(2); b.rejected.inc(5)
    >>> [line for line in merge_replicas({"r1": a.render(), "r2": b.render()}).decode().splitlines()
    ...  if line.startswith("iro_requests_rejected_total")]
    ['iro_requests_rejected_total{replica="r1"} 2.0', 'iro_requests_rejected_total{replica="r2"} 5.0']
    """
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text.decode() if isinstance(text, bytes) else text):
            merged = families.get(family.name)
            if merged is None:
                merged = families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
            merged.samples += [sample._replace(labels={**sample.labels, label: replica}) for sample in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(list(families.values())))
    return generate_latest(registry)


class MetricsMiddleware:
    """Pure ASGI middleware (streaming-safe): counts requests by route and status, times them."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)
