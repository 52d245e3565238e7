"""What the batcher reports (BatchMetrics), and the Prometheus instruments that record it and the HTTP layer's
requests (Metrics). Outside service/http/ so that Cog's runner, which has a batcher but no HTTP app, does not
depend on the HTTP package. Each Metrics has its own registry, so several apps (tests) never share or
double-register counters."""

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32)


class BatchMetrics(Protocol):
    """What service/batcher.py reports, whoever records it."""

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """`depth()` is the number of requests waiting for the GPU now (read at each scrape)."""

    def batch_started(self, images: int) -> None:
        """One engine call started with `images` images."""

    def generation_failed(self) -> None:
        """An engine call (render or finish) raised."""

    def never_rendered(self, reason: str) -> None:
        """A request left the queue before its batch started: reason client_gone or other."""


class Metrics:
    """The Prometheus instruments of one app (or Cog runner); a BatchMetrics."""

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

    def watch_queue(self, depth: Callable[[], int]) -> None:
        self.queue_depth.set_function(depth)

    def batch_started(self, images: int) -> None:
        self.batch_images.observe(images)

    def generation_failed(self) -> None:
        self.failures.inc()

    def never_rendered(self, reason: str) -> None:
        self.unrendered.labels(reason).inc()
