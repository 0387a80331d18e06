"""MLPerf-style scenarios derived from measured per-batch latencies.

Single-stream is batch 1's latency (MLPerf reports its 90th percentile); offline is the best throughput over
the batch sizes. Server is simulated: Poisson arrivals at a rate, a dynamic batcher that takes whatever is
queued up to the largest measured batch size, and service times drawn from the measured samples of the batch
size that batch would be padded to. The search finds the highest rate whose p99 latency stays under the SLO.
It models the engine's queueing, not HTTP: `inferforge loadtest` measures the real server.
"""

from __future__ import annotations

import bisect
from dataclasses import asdict, dataclass

import numpy as np

from inferforge.bench.timing import Timing


@dataclass(frozen=True)
class ServerScenario:
    slo_ms: float
    max_qps: float  # the highest Poisson arrival rate whose simulated p99 met the SLO (0 if none)
    p50_ms: float
    p99_ms: float
    mean_batch: float

    def to_json(self) -> dict:
        return asdict(self)


def simulate_server(
    per_batch: dict[int, Timing], qps: float, requests: int = 4000, seed: int = 0
) -> tuple[np.ndarray, float]:
    """End-to-end latencies (ms) of `requests` Poisson arrivals served by a greedy dynamic batcher, and the
    mean batch."""
    sizes = sorted(per_batch)
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1000.0 / qps, requests))
    latencies = np.empty(requests)
    free_at, i, batches = 0.0, 0, []
    while i < requests:
        start = max(free_at, arrivals[i])
        waiting = bisect.bisect_right(arrivals, start, lo=i) - i
        take = min(max(waiting, 1), sizes[-1])
        padded = sizes[bisect.bisect_left(sizes, take)]
        samples = per_batch[padded].samples_ms or (per_batch[padded].p50_ms,)
        done = start + samples[rng.integers(len(samples))]
        latencies[i : i + take] = done - arrivals[i : i + take]
        batches.append(take)
        free_at, i = done, i + take
    return latencies, float(np.mean(batches))


def server_scenario(per_batch: dict[int, Timing], slo_ms: float) -> ServerScenario:
    """Bisect on the arrival rate for the highest one whose simulated p99 latency meets the SLO."""
    best = max(t.throughput for t in per_batch.values())
    low, high, found = 0.0, best, None
    for _ in range(14):
        rate = (low + high) / 2
        latencies, mean_batch = simulate_server(per_batch, rate)
        if np.percentile(latencies, 99) <= slo_ms:
            low, found = rate, (rate, latencies, mean_batch)
        else:
            high = rate
    if found is None:
        return ServerScenario(slo_ms, 0.0, float("nan"), float("nan"), 0.0)
    rate, latencies, mean_batch = found
    p50, p99 = float(np.percentile(latencies, 50)), float(np.percentile(latencies, 99))
    return ServerScenario(slo_ms, rate, p50, p99, mean_batch)
