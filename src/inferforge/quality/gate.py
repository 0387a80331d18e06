"""The quality gate: run a variant on the evaluation data and hold it to the user's budget against the
original.

A variant that breaks the budget is never chosen; it stays in the report with the reasons, so nothing
regresses silently. The reference is the fp32 original on the same device with tf32 off.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from inferforge.models.data import EvalData
from inferforge.models.tasks import Task


@dataclass(frozen=True)
class Budget:
    """How much worse than the fp32 original a variant may be."""

    max_metric_drop: float = 1.0  # percentage points of the task metric
    min_fidelity: float = (
        0.99  # the task's primary fidelity figure (top-1 agreement, mean cosine, 1 - rel. error)
    )

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_metric_drop <= 100.0:
            raise ValueError(
                f"max_metric_drop must be in [0, 100] percentage points, got {self.max_metric_drop}"
            )
        if not 0.0 <= self.min_fidelity <= 1.0:
            raise ValueError(f"min_fidelity must be in [0, 1], got {self.min_fidelity}")


@dataclass(frozen=True)
class QualityReport:
    metric_name: str
    metric: float
    reference_metric: float
    metric_drop: float
    fidelity_name: str
    fidelity: dict[str, float]
    finite: bool
    passed: bool
    reasons: tuple[str, ...]

    @property
    def primary_fidelity(self) -> float:
        return self.fidelity.get(self.fidelity_name, float("nan"))

    def to_json(self) -> dict:
        return asdict(self) | {"reasons": list(self.reasons)}


def run_outputs(
    forward: Callable[..., torch.Tensor],
    data: EvalData,
    batch_size: int = 64,
    rows: slice | None = None,
    pad: bool = False,
) -> torch.Tensor:
    """fp32 CPU outputs of `forward` over the data (or a slice of it), batch by batch.

    With `pad`, a short last batch is padded (repeating its last row) to `batch_size`, so a compiled variant
    sees only the shapes it is benchmarked at instead of compiling once more for the remainder.
    """
    start0, stop0, _ = (rows or slice(None)).indices(len(data))
    chunks = []
    for start in range(start0, stop0, batch_size):
        end = min(start + batch_size, stop0)
        index = torch.arange(start, end)
        if pad and end - start < batch_size:
            index = torch.cat([index, index[-1:].expand(batch_size - (end - start))])
        out = forward(*data.rows(index)).detach().float().cpu()
        chunks.append(out[: end - start].clone())
    return torch.cat(chunks)


def judge(
    task: Task, outputs: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None, budget: Budget
) -> QualityReport:
    """Compare outputs with the reference's and apply the budget."""
    finite = bool(torch.isfinite(outputs).all())
    reference_metric = task.metric(reference, labels, reference)
    if finite:
        metric = task.metric(outputs, labels, reference)
        fidelity = task.fidelity(outputs, reference)
    else:
        metric, fidelity = float("nan"), {task.fidelity_name: float("nan")}
    drop = reference_metric - metric
    reasons = []
    if not finite:
        reasons.append(f"{int((~torch.isfinite(outputs)).sum())} outputs are NaN or infinite")
    elif drop > budget.max_metric_drop:
        reasons.append(f"{task.metric_name} dropped {drop:.3f} points > budget {budget.max_metric_drop}")
    primary = fidelity.get(task.fidelity_name, float("nan"))
    if finite and not (primary >= budget.min_fidelity):
        reasons.append(f"{task.fidelity_name} {primary:.4f} < budget {budget.min_fidelity}")
    return QualityReport(
        metric_name=task.metric_name,
        metric=metric,
        reference_metric=reference_metric,
        metric_drop=drop if math.isfinite(drop) else float("inf"),
        fidelity_name=task.fidelity_name,
        fidelity=fidelity,
        finite=finite,
        passed=not reasons,
        reasons=tuple(reasons),
    )


def evaluate(
    forward: Callable[..., torch.Tensor],
    data: EvalData,
    task: Task,
    reference: torch.Tensor,
    budget: Budget,
    batch_size: int = 64,
    pad: bool = False,
) -> QualityReport:
    """Run `forward` (a variant) on all of `data` and judge it against the reference outputs."""
    return judge(task, run_outputs(forward, data, batch_size, pad=pad), reference, data.labels, budget)
