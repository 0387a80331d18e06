"""Prometheus metrics of the OpenAI server, in a registry of its own so two apps in one process never meet.

With `--api-server-count N` each HTTP worker records its requests in prometheus-client's multiprocess files
(the supervisor sets `PROMETHEUS_MULTIPROC_DIR` before it spawns them), and a scrape of any worker sums all of
them. The engine's figures are not per worker: they are read from the engine when scraped (`EngineCollector`).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inferforge.llm.protocol import EngineClient, EngineStats, RequestTiming

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
)
_ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


class EngineCollector:
    """The engine's gauges and cumulative counters, built from its stats at scrape time.

    One engine serves every HTTP worker, so these come from it, not from the workers' files (summing them
    per worker would count the engine N times)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.latest: EngineStats | None = None  # set by the app just before a scrape, when it can ask

    def collect(self):  # type: ignore[no-untyped-def]
        s = self.latest or self.engine.stats()
        p = "inferforge_llm_"
        yield _gauge(p + "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.",
                     s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)  # fmt: skip
        yield _gauge(p + "kv_cache_blocks_used", "KV-cache blocks in use.", s.kv_blocks_used)
        yield _gauge(p + "num_requests_running", "Requests in the running batch.", s.running)
        yield _gauge(p + "num_requests_waiting", "Requests in the waiting queue.", s.waiting)
        loop = CounterMetricFamily(
            p + "engine_loop_seconds",
            "Seconds of the engine process's loop by phase (step, ipc_in, ipc_out, idle).",
            labels=["phase"],
        )
        for phase, seconds in s.loop_seconds:
            loop.add_metric([phase], seconds)
        yield loop
        wait_doc = "Seconds the engine loop was blocked on the GPU."
        yield CounterMetricFamily(p + "engine_device_wait_seconds", wait_doc, value=s.device_wait_s_total)
        yield CounterMetricFamily(p + "prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache.",
                                  value=s.prefix_cached_tokens_total)  # fmt: skip
        yield CounterMetricFamily(p + "num_preemptions", "Running requests preempted (KV cache full).",
                                  value=s.preemptions_total)  # fmt: skip
        yield CounterMetricFamily(p + "recomputed_tokens", "Tokens computed again after preemptions.",
                                  value=s.recomputed_tokens_total)  # fmt: skip
        yield CounterMetricFamily(p + "spec_decode_draft_tokens", "Tokens drafted by prompt lookup.",
                                  value=s.spec_draft_tokens_total)  # fmt: skip
        yield CounterMetricFamily(p + "spec_decode_accepted_tokens", "Drafted tokens the model agreed with.",
                                  value=s.spec_accepted_tokens_total)  # fmt: skip
        yield CounterMetricFamily(p + "engine_generated_tokens", "Tokens the engine generated (all workers).",
                                  value=s.generated_tokens_total)  # fmt: skip


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=float(value))


class ServerMetrics:
    """Histograms per request (observed once it finishes) and the engine's figures (read at scrape time).

    `multiprocess_dir`: the `PROMETHEUS_MULTIPROC_DIR` of a server with several HTTP workers. The request
    series then live in that folder's files (prometheus-client chose file-backed values at import, because the
    variable was set before this process started) and are summed over every worker at each scrape."""

    def __init__(self, engine: EngineClient, multiprocess_dir: str | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if multiprocess_dir is not None:
            multiprocess.MultiProcessCollector(self.registry, path=multiprocess_dir)
        r = None if multiprocess_dir is not None else self.registry
        self.engine_stats = EngineCollector(engine)
        self.registry.register(self.engine_stats)
        p = "inferforge_llm_"
        self.ttft = Histogram(
            p + "time_to_first_token_seconds", "Arrival to first token.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.itl = Histogram(
            p + "inter_token_latency_seconds",
            "Gap between tokens of a sequence, as served.",
            registry=r,
            buckets=_ITL_BUCKETS,
        )
        self.queue = Histogram(
            p + "queue_time_seconds",
            "Arrival to leaving the waiting queue.",
            registry=r,
            buckets=_LATENCY_BUCKETS,
        )
        self.prefill = Histogram(
            p + "prefill_time_seconds", "Scheduled to first token.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.decode = Histogram(
            p + "decode_time_seconds", "First token to finish.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.e2e = Histogram(
            p + "e2e_request_latency_seconds", "Arrival to finish.", registry=r, buckets=_LATENCY_BUCKETS
        )
        self.tps = Histogram(
            p + "request_generated_tokens_per_second",
            "Generated tokens of a request over its arrival-to-finish time.",
            registry=r,
            buckets=_RATE_BUCKETS,
        )
        self.requests = Counter(
            p + "requests", "Finished HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter(p + "prompt_tokens", "Prompt tokens of finished requests.", registry=r)
        self.generation_tokens = Counter(p + "generation_tokens", "Tokens generated and served.", registry=r)
        self.aborted = Counter(
            p + "aborted_requests", "Engine requests aborted (client gone, drain).", registry=r
        )
        if multiprocess_dir is not None:  # one series per live worker (label pid): how many serve now
            up = Gauge(p + "http_worker_up", "1 for each live HTTP worker process.", registry=None,
                       multiprocess_mode="liveall")  # fmt: skip
            up.set(1)

    def observe_timing(self, t: RequestTiming, completion_tokens: int) -> None:
        if t.scheduled is not None:
            self.queue.observe(max(t.scheduled - t.arrival, 0.0))
        if t.first_token is not None:
            self.ttft.observe(max(t.first_token - t.arrival, 0.0))
            if t.scheduled is not None:
                self.prefill.observe(max(t.first_token - t.scheduled, 0.0))
        if t.finished is not None:
            e2e = max(t.finished - t.arrival, 1e-9)
            self.e2e.observe(e2e)
            self.tps.observe(completion_tokens / e2e)
            if t.first_token is not None:
                self.decode.observe(max(t.finished - t.first_token, 0.0))

    def render(self, stats: EngineStats | None = None) -> bytes:
        """The exposition text; `stats`: the engine's current figures when the caller could ask for them."""
        self.engine_stats.latest = stats
        try:
            return generate_latest(self.registry)
        finally:
            self.engine_stats.latest = None


class ITLClock:
    """Server-side inter-token gaps per sequence: the latency a client actually sees between tokens."""

    def __init__(self, hist: Histogram) -> None:
        self.hist = hist
        self.last: dict[tuple[int, int], float] = {}

    def tick(self, key: tuple[int, int], n_tokens: int) -> None:
        now = time.perf_counter()
        prev = self.last.get(key)
        self.last[key] = now
        if prev is not None and n_tokens > 0:
            gap = (now - prev) / n_tokens
            for _ in range(n_tokens):
                self.hist.observe(gap)
