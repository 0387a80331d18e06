"""Tasks: what a model's output means, how to score it and how close a variant stays to the original.

Every loaded model is a module called with positional tensors that returns one tensor; the task reads that
tensor. Metrics are in percent so that a user's `--max-metric-drop 0.5` reads as half a point, whatever the
task.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from inferforge.errors import DataError


def _relative_errors(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    out, ref = outputs.double().flatten(1), reference.double().flatten(1)
    rel_l2 = (out - ref).norm() / ref.norm().clamp_min(1e-30)
    return {"rel_l2": float(rel_l2), "max_abs_err": float((out - ref).abs().max())}


class Task(ABC):
    """Scoring rules for one kind of output."""

    name: ClassVar[str]
    output_name: ClassVar[str]
    metric_name: ClassVar[str]
    fidelity_name: ClassVar[str]  # the fidelity figure that `--min-fidelity` bounds

    @abstractmethod
    def metric(self, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
        """The task metric in percent, higher is better."""

    @abstractmethod
    def fidelity(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        """How close a variant's outputs are to the original's, per figure."""

    def to_json(self) -> str:
        return self.name


class ClassificationTask(Task):
    """Logits in, top-1 accuracy against labels; without labels, agreement with the original's top-1."""

    name = "classification"
    output_name = "logits"
    metric_name = "top1_accuracy"
    fidelity_name = "top1_agreement"

    def metric(self, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
        target = reference.argmax(-1) if labels is None else labels.long()
        if target.shape[0] != outputs.shape[0]:
            raise DataError(f"{target.shape[0]} labels for {outputs.shape[0]} examples")
        return 100.0 * float((outputs.argmax(-1) == target).double().mean())

    def fidelity(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        log_p = F.log_softmax(reference.double(), -1)
        log_q = F.log_softmax(outputs.double(), -1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")
        agreement = (outputs.argmax(-1) == reference.argmax(-1)).double().mean()
        cosine = F.cosine_similarity(outputs.double(), reference.double(), dim=-1).mean()
        return {
            "top1_agreement": float(agreement),
            "kl": float(kl),
            "cosine": float(cosine),
        } | _relative_errors(outputs, reference)


class EmbeddingTask(Task):
    """Vectors in; the metric is retrieval agreement: does each text find the same nearest neighbour as
    before."""

    name = "embedding"
    output_name = "embedding"
    metric_name = "retrieval_agreement"
    fidelity_name = "cosine_mean"

    @staticmethod
    def _nearest(vectors: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(vectors.double().flatten(1), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(-2.0)
        return similarity.argmax(-1)

    def metric(self, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
        if outputs.shape[0] < 2:
            return 100.0
        return 100.0 * float((self._nearest(outputs) == self._nearest(reference)).double().mean())

    def fidelity(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        cosine = F.cosine_similarity(outputs.double().flatten(1), reference.double().flatten(1), dim=-1)
        return {"cosine_mean": float(cosine.mean()), "cosine_min": float(cosine.min())} | _relative_errors(
            outputs, reference
        )


class TensorTask(Task):
    """Any tensors out; the metric is 100 minus the relative L2 error in percent."""

    name = "tensor"
    output_name = "output"
    metric_name = "100_minus_rel_err_pct"
    fidelity_name = "one_minus_rel_l2"

    def metric(self, outputs: torch.Tensor, labels: torch.Tensor | None, reference: torch.Tensor) -> float:
        return 100.0 - 100.0 * _relative_errors(outputs, reference)["rel_l2"]

    def fidelity(self, outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
        errors = _relative_errors(outputs, reference)
        return {"one_minus_rel_l2": 1.0 - errors["rel_l2"]} | errors


TASKS: dict[str, Task] = {task.name: task for task in (ClassificationTask(), EmbeddingTask(), TensorTask())}


def get_task(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"unknown task {name!r}; choose one of {sorted(TASKS)} (flag --task)") from None
