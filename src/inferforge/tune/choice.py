"""Candidates to try, the objective that ranks them, the choice, and the speed-quality Pareto front."""

from __future__ import annotations

import math

from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.tune.results import CandidateResult

CPU_EAGER = ("fp32", "bf16", "int8_weight", "int8_dynamic", "onnxruntime")
GPU_EAGER = (
    "fp32",
    "tf32",
    "bf16",
    "fp16",
    "bf16+int8_weight",
    "bf16+int8_dynamic",
    "bf16+fp8",
    "bf16+int4_weight",
)
GPU_CONV = ("bf16+channels_last", "fp16+channels_last")


def _native_cpu_bf16() -> bool:
    """Without AVX512-BF16 or AMX, bf16 is emulated: MiniLM at batch 64 ran 5 seq/s against fp32's 22 on a
    2-core AVX2 machine, so the automatic search leaves it out there (asking for it by name still works)."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def eager_candidates(techniques: str, model: LoadedModel, device: str) -> list[str]:
    """The recipes of the first round: the user's list, or every precision and quantization that may apply."""
    if techniques != "auto":
        return list(dict.fromkeys(r.strip() for r in techniques.split(",") if r.strip()))
    if not device.startswith("cuda"):
        return [r for r in CPU_EAGER if r != "bf16" or _native_cpu_bf16()]
    has_conv = any(isinstance(m, nn.Conv2d) for m in model.module.modules())
    return [*GPU_EAGER[:4], *(GPU_CONV if has_conv else ()), *GPU_EAGER[4:]]


def compiled_candidates(
    ranked: list[CandidateResult], top: int, device: str, batch_sizes: tuple[int, ...]
) -> list[str]:
    """torch.compile on the best passing eager recipes: with CUDA graphs on a GPU, plain inductor on a CPU.

    On the H100, CUDA graphs matched plain compile at large batches (ResNet-50 bs256: 23,743 vs 23,780 img/s)
    and beat it where launches dominate (MiniLM bs64: 37,463 vs 21,515 seq/s), so compiling both doubles the
    compile time for nothing.
    """
    eligible = [
        c for c in ranked if c.stage == "eager" and "onnxruntime" not in c.recipe and "+keep" not in c.recipe
    ]
    suffix = "+compile:mode=cudagraphs" if device.startswith("cuda") else "+compile"
    return [f"{candidate.recipe}{suffix}" for candidate in eligible[:top]]


def objective_value(candidate: CandidateResult, objective: str, slo_ms: float | None) -> float:
    """Larger is better; -inf when the candidate has no timing."""
    bench = candidate.bench
    if bench is None:
        return -math.inf
    if objective == "throughput":
        return bench.best_throughput[1]
    if objective == "latency":
        return -bench.single_stream_ms
    return -float(bench.size_bytes + (bench.peak_mem_bytes or 0))


def meets_slo(candidate: CandidateResult, objective: str, slo_ms: float | None) -> bool:
    if objective != "latency" or slo_ms is None or candidate.bench is None:
        return True
    return candidate.bench.per_batch[min(candidate.bench.per_batch)].p99_ms <= slo_ms


def rank(candidates: list[CandidateResult], objective: str, slo_ms: float | None) -> list[CandidateResult]:
    passing = [c for c in candidates if c.passed and c.stage != "baseline"]
    return sorted(passing, key=lambda c: objective_value(c, objective, slo_ms), reverse=True)


def pareto_front(candidates: list[CandidateResult], objective: str, slo_ms: float | None) -> list[str]:
    """Candidates no other beats on both speed (the objective) and quality (the task metric)."""
    points = [
        (c.recipe, objective_value(c, objective, slo_ms), c.quality.metric)
        for c in candidates
        if c.bench is not None and c.quality is not None and math.isfinite(c.quality.metric)
    ]
    front = []
    for name, speed, quality in points:
        dominated = any(
            (s >= speed and q >= quality) and (s > speed or q > quality) for n, s, q in points if n != name
        )
        if not dominated:
            front.append(name)
    return front
