"""Prometheus metrics of the OpenAI server, in a registry of its own so two apps in one process never meet."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from inferforge.llm.protocol import EngineClient, RequestTiming

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


class ServerMetrics:
    """Histograms per request (observed once it finishes) and engine gauges (read at scrape time)."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.kv_usage = Gauge(p + "kv_cache_usage_ratio", "Fraction of KV-cache blocks in use.", registry=r)
        self.kv_used = Gauge(p + "kv_cache_blocks_used", "KV-cache blocks in use.", registry=r)
        self.running = Gauge(p + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(p + "num_requests_waiting", "Requests in the waiting queue.", registry=r)
        self.loop = Counter(
            p + "engine_loop_seconds",
            "Seconds of the engine process's loop by phase (step, ipc_in, ipc_out, idle); sent with each "
            "step's outputs, so idle time shows once the next step lands.",
            ["phase"],
            registry=r,
        )
        self.device_wait = Counter(
            p + "engine_device_wait_seconds", "Seconds the engine loop was blocked on the GPU.", registry=r
        )
        self.prefix_cached = Counter(
            p + "prefix_cache_hit_tokens", "Prompt tokens read from the prefix cache.", registry=r
        )
        self._seen: dict[str, float] = {}  # the engine's cumulative figures already counted

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

    def render(self) -> bytes:
        s = self.engine.stats()
        self.kv_used.set(s.kv_blocks_used)
        self.kv_usage.set(s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        self.running.set(s.running)
        self.waiting.set(s.waiting)
        self._count_up(self.device_wait, "device_wait", s.device_wait_s_total)
        self._count_up(self.prefix_cached, "prefix_cached", s.prefix_cached_tokens_total)
        for phase, seconds in s.loop_seconds:
            self._count_up(self.loop.labels(phase=phase), phase, seconds)
        return generate_latest(self.registry)

    def _count_up(self, counter: Counter, key: str, total: float) -> None:
        """Counters only go up: add what the engine's cumulative figure gained since the last scrape."""
        gain = total - self._seen.get(key, 0.0)
        if gain > 0:
            counter.inc(gain)
            self._seen[key] = total


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
