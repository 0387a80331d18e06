"""One candidate's life: apply its recipe, validate it, fall back on sensitive layers if it fails, time it."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferforge.bench import BenchConfig, measure
from inferforge.bench.timing import time_batch_size
from inferforge.errors import NotApplicable
from inferforge.models.data import EvalData
from inferforge.models.loaded import LoadedModel
from inferforge.quality import Budget, evaluate
from inferforge.quality.sensitivity import fallback
from inferforge.techniques import Recipe, Variant, apply_recipe
from inferforge.tune.results import CandidateResult


@dataclass
class SearchContext:
    """What every candidate shares: the model, data, reference outputs, budget and timing settings."""

    model: LoadedModel
    data: EvalData
    reference: torch.Tensor
    budget: Budget
    device: str
    batch_sizes: tuple[int, ...]
    bench: BenchConfig
    fallback_attempts: int
    latency_slo_ms: float | None
    baseline: dict[int, float] | None = None  # fp32 eager throughput per batch size, once measured
    on_stage: Callable[[str], None] = lambda stage: None


def _free(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _validate(recipe: Recipe, ctx: SearchContext, result: CandidateResult) -> Variant:
    """The variant to time: the recipe's own, or the fallback's when that one passes where the recipe
    failed."""
    ctx.on_stage("applying")
    variant = apply_recipe(recipe, ctx.model, ctx.data.rows(slice(0, 2)), ctx.device)
    ctx.on_stage("validating")
    compiled = recipe.has("graph")  # validate at a benchmarked batch size, padded, so no extra compile
    batch = max(ctx.batch_sizes) if compiled else 64
    result.quality = evaluate(
        variant, ctx.data, ctx.model.task, ctx.reference, ctx.budget, batch, pad=compiled
    )
    result.notes = list(variant.context.notes)
    if result.quality.passed or not recipe.has("quantization") or ctx.fallback_attempts < 1:
        return variant
    if _slower_than_baseline(variant, ctx, result):
        return variant
    ctx.on_stage("sensitivity fallback")
    found = fallback(
        recipe, ctx.model, ctx.data, ctx.reference, ctx.budget, ctx.device, ctx.fallback_attempts
    )
    result.fallback = found.to_json()
    if found.variant is None:
        return variant
    del variant
    _free(ctx.device)
    result.recipe = f"{result.recipe}+keep[{len(found.kept)}]"
    result.quality = found.quality
    result.notes = list(found.variant.context.notes)
    return found.variant


def _slower_than_baseline(variant: Variant, ctx: SearchContext, result: CandidateResult) -> bool:
    """A failing candidate slower than fp32 cannot become worth shipping by keeping layers in higher
    precision."""
    if not ctx.baseline:
        return False
    batch = max(ctx.batch_sizes)
    ctx.on_stage("speed probe before fallback")
    probe = BenchConfig(warmup=1, min_iters=3, max_iters=3, min_time_s=0.0, max_time_s=5.0)
    throughput = time_batch_size(variant, ctx.data, batch, probe).throughput
    if throughput >= ctx.baseline.get(batch, 0.0):
        return False
    result.notes.append(
        f"sensitivity fallback skipped: {throughput:,.0f}/s at batch {batch} is below the fp32 "
        f"baseline's {ctx.baseline[batch]:,.0f}/s"
    )
    return True


def run_candidate(label: str, stage: str, ctx: SearchContext) -> tuple[CandidateResult, Variant | None]:
    """Never raises for a bad candidate: the reason lands in the result, and the search goes on."""
    result = CandidateResult(recipe=label, stage=stage)
    started = time.perf_counter()
    variant = None
    try:
        variant = _validate(Recipe.parse(label), ctx, result)
        ctx.on_stage(
            f"timing batch sizes {','.join(map(str, ctx.batch_sizes))}"
        )  # failing ones too: the report
        result.bench = measure(
            variant, ctx.data, ctx.batch_sizes, ctx.bench, ctx.latency_slo_ms
        )  # shows the trade
        result.status = "passed" if result.quality and result.quality.passed else "failed_quality"
        if not result.passed and result.quality:
            result.reason = "; ".join(result.quality.reasons)
    except NotApplicable as exc:
        result.status, result.reason = "not_applicable", str(exc)
    except Exception as exc:  # any library's failure is this candidate's, never the search's: keep going
        result.status, result.reason = "error", f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        variant = None
    result.seconds = time.perf_counter() - started
    return result, variant if result.passed else None
