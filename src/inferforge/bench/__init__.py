"""Benchmark: time a variant per batch size, its memory and size, and the MLPerf-style scenarios."""

from __future__ import annotations

from dataclasses import dataclass

from inferforge.bench.memory import model_size_bytes, peak_bytes, power_watts, reset_peak
from inferforge.bench.scenarios import ServerScenario, server_scenario
from inferforge.bench.timing import BenchConfig, Timing, time_batch_size
from inferforge.models.data import EvalData
from inferforge.techniques import Variant


@dataclass(frozen=True)
class BenchReport:
    per_batch: dict[int, Timing]
    size_bytes: int
    peak_mem_bytes: int | None
    compile_s: float
    power_w: float | None
    server: ServerScenario | None = None

    @property
    def best_throughput(self) -> tuple[int, float]:
        batch, timing = max(self.per_batch.items(), key=lambda kv: kv[1].throughput)
        return batch, timing.throughput

    @property
    def single_stream_ms(self) -> float:
        """p50 latency at the smallest batch size measured (batch 1 when asked for)."""
        return self.per_batch[min(self.per_batch)].p50_ms

    def to_json(self) -> dict:
        batch, throughput = self.best_throughput
        return {
            "per_batch": {str(b): t.to_json() for b, t in sorted(self.per_batch.items())},
            "size_bytes": self.size_bytes,
            "peak_mem_bytes": self.peak_mem_bytes,
            "compile_s": self.compile_s,
            "power_w": self.power_w,
            "energy_j_per_item": (self.power_w / throughput) if self.power_w and throughput else None,
            "offline": {"batch_size": batch, "throughput": throughput},
            "single_stream": {
                "batch_size": min(self.per_batch),
                "p50_ms": self.single_stream_ms,
                "p90_ms": self.per_batch[min(self.per_batch)].p90_ms,
            },
            "server": self.server.to_json() if self.server else None,
        }


def measure(
    variant: Variant,
    data: EvalData,
    batch_sizes: tuple[int, ...],
    config: BenchConfig | None = None,
    latency_slo_ms: float | None = None,
) -> BenchReport:
    """Time every batch size; peak memory covers the whole measurement."""
    config = config or BenchConfig()
    reset_peak(variant.device)
    per_batch = {b: time_batch_size(variant, data, b, config) for b in sorted(batch_sizes)}
    power = power_watts(variant.device)
    server = server_scenario(per_batch, latency_slo_ms) if latency_slo_ms else None
    return BenchReport(
        per_batch=per_batch,
        size_bytes=model_size_bytes(variant.module),
        peak_mem_bytes=peak_bytes(variant.device),
        compile_s=variant.context.compile_s,
        power_w=power,
        server=server,
    )


__all__ = ["BenchConfig", "BenchReport", "ServerScenario", "Timing", "measure"]
