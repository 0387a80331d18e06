"""`optimize`: load, validate and time every candidate, choose the best that passes, and write the run folder.

Two rounds: eager candidates (precisions, quantization) first, then torch.compile on the best passing ones, so
compile time is spent only where it can pay. The fp32 eager run is the reference and the baseline; on a GPU
the eager bf16 run is the named peer every speed-up is also quoted against.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch

from inferforge.bench import BenchConfig
from inferforge.errors import BudgetError, DataError
from inferforge.models import load_data, load_model
from inferforge.quality import Budget, run_outputs
from inferforge.techniques import Recipe, Variant, apply_recipe
from inferforge.tune.candidate import SearchContext, run_candidate
from inferforge.tune.choice import (
    compiled_candidates,
    eager_candidates,
    meets_slo,
    objective_value,
    pareto_front,
    rank,
)
from inferforge.tune.config import OptimizeConfig
from inferforge.tune.display import Display
from inferforge.tune.report import write_report
from inferforge.tune.results import CandidateResult, RunResult
from inferforge.versions import library_versions

PEER = "bf16"


def _environment(device: str) -> dict:
    env = {
        "device": device,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": library_versions(),
    }
    if device.startswith("cuda"):
        env["device_name"] = torch.cuda.get_device_name(torch.device(device))
    return env


def _reference(config: OptimizeConfig, device: str):
    model = load_model(config.model, config.task)
    data = load_data(config.data, model)
    reference_variant = apply_recipe(Recipe.parse("fp32"), model, data.rows(slice(0, 2)), device)
    try:
        reference = run_outputs(reference_variant, data)
    except RuntimeError as exc:
        raise DataError(f"the model cannot run on data {data.source}: {str(exc).splitlines()[0]}") from exc
    return model, data, reference


def _search(
    config: OptimizeConfig, ctx: SearchContext, display: Display
) -> tuple[list[CandidateResult], Variant | None]:
    results: list[CandidateResult] = []
    best: tuple[CandidateResult, Variant] | None = None

    def run(label: str, stage: str) -> None:
        nonlocal best
        ctx.on_stage = display.start(label)
        result, variant = run_candidate(label, stage, ctx)
        if result.passed and not meets_slo(result, config.objective, config.latency_slo_ms):
            result.status, result.reason = "slo_miss", f"p99 above the {config.latency_slo_ms} ms SLO"
            variant = None
        results.append(result)
        display.finish(result)
        if label == "fp32" and result.bench is not None:
            ctx.baseline = {b: t.throughput for b, t in result.bench.per_batch.items()}
        if (
            variant is not None
            and stage != "baseline"
            and (
                best is None
                or objective_value(result, config.objective, None)
                > objective_value(best[0], config.objective, None)
            )
        ):
            best = (result, variant)
        elif variant is not None:
            del variant
        if ctx.device.startswith("cuda"):
            torch.cuda.empty_cache()

    labels = eager_candidates(config.techniques, ctx.model, ctx.device)
    if "fp32" not in labels:
        run("fp32", "baseline")  # timed for the speed-ups, not eligible: the user did not ask for it
    for label in labels:
        run(label, "eager")
    if config.techniques == "auto":
        ranked = rank(results, config.objective, None)
        for label in compiled_candidates(ranked, config.compile_top, ctx.device, ctx.batch_sizes):
            run(label, "compiled")
    return results, best[1] if best else None


def _speedups(results: list[CandidateResult], hourly_usd: float | None) -> tuple[str, str | None]:
    def throughput(label: str) -> float | None:
        found = [c for c in results if c.recipe == label and c.bench]
        return found[0].bench.best_throughput[1] if found else None

    base, peer = throughput("fp32"), throughput(PEER)
    for c in results:
        if c.bench:
            c.speedup_vs_baseline = c.bench.best_throughput[1] / base if base else None
            c.speedup_vs_peer = c.bench.best_throughput[1] / peer if peer else None
            if hourly_usd:
                c.cost_per_million_usd = hourly_usd / 3600.0 / c.bench.best_throughput[1] * 1e6
    return "fp32", PEER if peer else None


SaveArtifact = Callable[..., Path]


def optimize(config: OptimizeConfig, save_artifact: SaveArtifact | None = None) -> RunResult:
    """Run the whole search; writes results.json and report.html under `config.out`.

    `save_artifact` (the registry's `save_artifact`, passed in by the caller so that tune never imports a
    stage to its right) writes the chosen variant to `out/artifact`. Raises BudgetError, after writing the
    report, when no candidate meets the budget.
    """
    started = time.perf_counter()
    device = config.resolved_device()
    batch_sizes = config.parsed_batch_sizes()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    model, data, reference = _reference(config, device)
    ctx = SearchContext(
        model=model,
        data=data,
        reference=reference,
        budget=Budget(config.max_metric_drop, config.min_fidelity),
        device=device,
        batch_sizes=batch_sizes,
        bench=BenchConfig(warmup=config.warmup, min_time_s=config.min_time_s),
        fallback_attempts=config.fallback_attempts,
        latency_slo_ms=config.latency_slo_ms,
    )
    with Display(enabled=not config.quiet) as display:
        results, best_variant = _search(config, ctx, display)
    baseline, peer = _speedups(results, config.gpu_hourly_usd)
    ranked = rank(results, config.objective, config.latency_slo_ms)
    chosen = ranked[0] if ranked and best_variant is not None else None
    artifact = None
    if chosen is not None and save_artifact is not None:
        artifact = save_artifact(
            out / "artifact",
            name=out.name,
            model=model,
            data=data,
            variant=best_variant,
            batch_sizes=batch_sizes,
            quality=chosen.quality.to_json() if chosen.quality else None,
            bench=chosen.bench.to_json() if chosen.bench else None,
        )
    run = RunResult(
        config={k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(config).items()},
        environment=_environment(device),
        data={
            "source": data.source,
            "rows": len(data),
            "fingerprint": data.fingerprint,
            "synthetic": data.synthetic,
            "reference_metric": model.task.metric(reference, data.labels, reference),
            "metric_name": model.task.metric_name,
            "has_labels": data.labels is not None,
        },
        candidates=results,
        chosen=chosen.recipe if chosen else None,
        pareto=pareto_front(results, config.objective, config.latency_slo_ms),
        baseline=baseline,
        peer=peer,
        elapsed_s=time.perf_counter() - started,
        artifact=str(artifact) if artifact else None,
    )
    write_report(run, out)
    if chosen is None:
        error = BudgetError(
            f"no candidate met the budget (max metric drop {config.max_metric_drop} points, min fidelity "
            f"{config.min_fidelity}); see {out / 'report.html'} for each candidate's reason"
        )
        error.run = run  # type: ignore[attr-defined]
        raise error
    return run
