"""Prometheus metrics for the V2 server: one registry per app, so several apps (tests) never collide.

The engine reports batches and queue depth through `EngineObserver`; the HTTP layer reports requests, their
outcome and their end-to-end latency. Device memory is read when scraped, not polled.

With `--http-workers N` every process keeps its series in prometheus-client's multiprocess files (the
parent sets `PROMETHEUS_MULTIPROC_DIR` before spawning), and a scrape of any process reads them all, so
`/metrics` describes the whole server rather than whichever process answered.
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class DeviceMemoryCollector:
    """Bytes held on each CUDA device by this process (torch's allocator), and the process's peak RSS."""

    def collect(self):  # type: ignore[no-untyped-def]
        family = GaugeMetricFamily(
            "inferforge_device_memory_bytes",
            "Memory held by this process per device",
            labels=["device", "kind"],
        )
        torch = sys.modules.get("torch")  # never import torch (or initialise CUDA) just to be scraped
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                family.add_metric([f"cuda:{i}", "allocated"], float(torch.cuda.memory_allocated(i)))
                family.add_metric([f"cuda:{i}", "reserved"], float(torch.cuda.memory_reserved(i)))
        rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        family.add_metric(["cpu", "max_rss"], float(rss_kib * 1024))
        yield family


class ServeMetrics:
    """All the server's series; implements the engine's `EngineObserver`.

    `multiprocess_dir` is the `PROMETHEUS_MULTIPROC_DIR` of an `--http-workers` server: the series are then
    left out of the scrape registry (their values live in that folder's files, which prometheus-client
    writes because the variable was set before it was imported) and `MultiProcessCollector` sums every
    process's files instead, so each series appears once for the whole server. Each gauge names how
    processes combine (`multiprocess_mode`); single-process serving ignores that.
    """

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry()
        self.multiprocess = multiprocess_dir is not None
        if multiprocess_dir is not None:
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)
        r = None if self.multiprocess else self.registry
        labels = ["model", "version"]
        self.requests = Counter(
            "inferforge_requests", "Inference requests by outcome", [*labels, "outcome"], registry=r
        )
        self.latency = Histogram(
            "inferforge_request_latency_seconds",
            "End-to-end latency in the server",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "inferforge_queue_seconds",
            "Time a request waited before its batch ran",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute = Histogram(
            "inferforge_compute_seconds",
            "Time one batch took in predict",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inferforge_batch_size",
            "Rows per batch run (before padding)",
            labels,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.padded_rows = Counter(
            "inferforge_padded_rows", "Rows added to reach a fixed batch size", labels, registry=r
        )
        # Live processes' requests and queues add up; a dead process's leftovers would be phantoms.
        self.inflight = Gauge(
            "inferforge_inflight_requests",
            "Requests received and not yet answered",
            ["model"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.queue_depth = Gauge(
            "inferforge_queue_depth",
            "Requests waiting in the model's queue",
            labels,
            registry=r,
            multiprocess_mode="livesum",
        )
        # Set by the scraped process just before rendering, so the most recent value is its fresh view
        # (every process serves the same models: model control is off with several workers).
        self.model_ready = Gauge(
            "inferforge_model_ready",
            "1 when the model version answers requests",
            labels,
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        # Read from the answering process at scrape time; other processes' memory cannot be read from here.
        self.registry.register(DeviceMemoryCollector())
        self._series: dict[tuple[str, str], tuple] = {}  # type: ignore[type-arg]

    def request_series(self, model: str, version: str) -> tuple:  # type: ignore[type-arg]
        """(in-flight gauge, success counter, latency histogram) of a model version, looked up once: the infer
        path reads them on every request and `labels()` takes a lock and builds a key each time."""
        key = (model, version)
        series = self._series.get(key)
        if series is None:
            series = (
                self.inflight.labels(model),
                self.requests.labels(model, version, "success"),
                self.latency.labels(model, version),
            )
            self._series[key] = series
        return series

    def on_batch(
        self, model: str, version: str, rows: int, padded: int, compute_s: float, queue_s: Sequence[float]
    ) -> None:
        self.compute.labels(model, version).observe(compute_s)
        self.batch_size.labels(model, version).observe(rows)
        if padded > rows:
            self.padded_rows.labels(model, version).inc(padded - rows)
        hist = self.queue.labels(model, version)
        for q in queue_s:
            hist.observe(q)

    def on_queue_depth(self, model: str, version: str, depth: int) -> None:
        self.queue_depth.labels(model, version).set(depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
