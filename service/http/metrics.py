"""Prometheus instruments of one app. Each app has its own registry, so several apps (tests) never
share or double-register counters."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "punks_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "punks_http_request_duration_seconds",
            "Time to answer an HTTP request.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_images = Histogram(
            "punks_batch_images", "Images generated per engine call.", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge("punks_queue_depth", "Requests waiting for the GPU.", registry=self.registry)
        self.failures = Counter(
            "punks_generation_failures", "Engine calls (render or finish) that raised.", registry=self.registry
        )
        self.unrendered = Counter(
            "punks_unrendered_requests",
            "Requests that left the queue before their batch started, so were never "
            "rendered: reason client_gone (the client hung up) or other (timeout, shutdown).",
            ["reason"],
            registry=self.registry,
        )
        self.disconnects = Counter(
            "punks_client_disconnects",
            "Generation requests whose client hung up before the answer (counted as "
            "status 499 in punks_http_requests).",
            registry=self.registry,
        )
