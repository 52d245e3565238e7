"""The Prometheus instruments now live in service/metrics.py (the batcher reports to them outside the HTTP
package); this name stays for the HTTP modules that import it from here."""

from service.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, BatchMetrics, Metrics

__all__ = ["BATCH_BUCKETS", "LATENCY_BUCKETS", "BatchMetrics", "Metrics"]
