"""Per model version counts and cumulative durations, in the shape of Triton's statistics extension.

Prometheus histograms answer "how is the server doing"; these answer Triton's `get_inference_statistics`,
which tools such as `perf_analyzer` read to split a request's time into queue, input preparation, model
execution and output extraction. Following Triton, `inference_stats` counts requests (each request of a
batch is charged the batch's compute durations) and `batch_stats` counts model executions per batch size.
Durations are nanoseconds from `time.perf_counter_ns`; everything is cumulative since the version loaded."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns * count

    def to_json(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@dataclass
class _BatchStats:
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration


_PHASES = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """Thread-safe: worker threads record batches while the event loop records request outcomes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases = {name: Duration() for name in _PHASES}
        self._batches: dict[int, _BatchStats] = {}
        self.inference_count = 0  # rows answered by the model (Triton: inferences, not requests)
        self.execution_count = 0  # calls to predict
        self.last_inference_ms = 0  # wall-clock milliseconds of the last execution; 0 before any

    def record_batch(
        self, rows: int, queue_ns: Sequence[int], input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        """One execution of `rows` rows for `len(queue_ns)` requests (each charged the whole batch's time)."""
        requests = len(queue_ns)
        with self._lock:
            phases = self._phases
            for q in queue_ns:
                phases["queue"].add(q)
            phases["compute_input"].add(input_ns, requests)
            phases["compute_infer"].add(infer_ns, requests)
            phases["compute_output"].add(output_ns, requests)
            batch = self._batches.get(rows)
            if batch is None:
                batch = self._batches[rows] = _BatchStats(Duration(), Duration(), Duration())
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)
            self.inference_count += rows
            self.execution_count += 1
            self.last_inference_ms = time.time_ns() // 1_000_000

    def record_request(self, ok: bool, ns: int) -> None:
        """A request's outcome and its whole time in the server (Triton's success and fail)."""
        with self._lock:
            self._phases["success" if ok else "fail"].add(ns)

    def to_json(self, name: str, version: str) -> dict:
        with self._lock:
            inference = {k: d.to_json() for k, d in self._phases.items()}
            inference["cache_hit"] = {"count": 0, "ns": 0}
            inference["cache_miss"] = {"count": 0, "ns": 0}
            batches = [
                {
                    "batch_size": size,
                    "compute_input": b.compute_input.to_json(),
                    "compute_infer": b.compute_infer.to_json(),
                    "compute_output": b.compute_output.to_json(),
                }
                for size, b in sorted(self._batches.items())
            ]
            return {
                "name": name,
                "version": version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": inference,
                "batch_stats": batches,
                "memory_usage": [],
            }
