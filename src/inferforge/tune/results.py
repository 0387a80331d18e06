"""`CandidateResult` and `RunResult`: what the search found, as it is written to `results.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferforge.bench import BenchReport
from inferforge.quality import QualityReport

RESULTS_SCHEMA_VERSION = 1
STATUSES = ("passed", "failed_quality", "slo_miss", "not_applicable", "error")


@dataclass
class CandidateResult:
    recipe: str
    stage: str  # "eager" or "compiled"
    status: str = "error"
    reason: str = ""
    quality: QualityReport | None = None
    bench: BenchReport | None = None
    fallback: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    speedup_vs_baseline: float | None = None  # best throughput over the fp32 eager baseline's
    speedup_vs_peer: float | None = None  # over the eager half-precision peer (bf16 on GPU), where measured
    cost_per_million_usd: float | None = None  # at the best throughput, given --gpu-hourly-usd

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_json(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "stage": self.stage,
            "status": self.status,
            "reason": self.reason,
            "quality": self.quality.to_json() if self.quality else None,
            "bench": self.bench.to_json() if self.bench else None,
            "fallback": self.fallback,
            "notes": self.notes,
            "seconds": self.seconds,
            "speedup_vs_baseline": self.speedup_vs_baseline,
            "speedup_vs_peer": self.speedup_vs_peer,
            "cost_per_million_usd": self.cost_per_million_usd,
        }


@dataclass
class RunResult:
    config: dict[str, Any]
    environment: dict[str, Any]
    data: dict[str, Any]
    candidates: list[CandidateResult]
    chosen: str | None
    pareto: list[str]
    baseline: str
    peer: str | None
    elapsed_s: float
    artifact: str | None

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": RESULTS_SCHEMA_VERSION,
            "config": self.config,
            "environment": self.environment,
            "data": self.data,
            "baseline": self.baseline,
            "peer": self.peer,
            "chosen": self.chosen,
            "pareto": self.pareto,
            "elapsed_s": self.elapsed_s,
            "artifact": self.artifact,
            "candidates": [c.to_json() for c in self.candidates],
        }

    def candidate(self, recipe: str) -> CandidateResult:
        return next(c for c in self.candidates if c.recipe == recipe)
