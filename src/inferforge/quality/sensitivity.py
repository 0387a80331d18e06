"""Per-layer sensitivity and fallback: when a quantized variant fails the gate, find the layers that hurt most
and keep them in higher precision, a bounded number of times (as Intel Neural Compressor and NVIDIA ModelOpt
do).

Each layer's score is the relative error of the model's output when that layer alone is quantized, measured on
a slice of the evaluation data; the report names the layers kept and their scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferforge.errors import InferforgeError
from inferforge.models.data import EvalData
from inferforge.models.loaded import LoadedModel
from inferforge.quality.gate import Budget, QualityReport, evaluate, run_outputs
from inferforge.techniques import Recipe, Variant, apply_recipe
from inferforge.techniques._torchao import quantizable_linears


@dataclass(frozen=True)
class Fallback:
    """What the fallback tried and what it found."""

    scores: tuple[tuple[str, float], ...]  # (layer, relative output error when quantized alone), worst first
    kept: tuple[str, ...]  # layers kept in higher precision in the final attempt
    attempts: int
    variant: Variant | None
    quality: QualityReport | None

    def to_json(self) -> dict:
        passed = self.quality.passed if self.quality else False
        return {
            "scores": [list(s) for s in self.scores[:20]],
            "kept": list(self.kept),
            "attempts": self.attempts,
            "passed": passed,
        }


def layer_scores(
    recipe: Recipe, model: LoadedModel, data: EvalData, reference: torch.Tensor, device: str, sample: int = 64
) -> list[tuple[str, float]]:
    """Relative output error with only one layer quantized, for every quantizable layer, worst first."""
    layers = quantizable_linears(model.module)
    rows = slice(0, min(sample, len(data)))
    example = data.rows(slice(0, 2))
    ref = reference[rows].double()
    scores = []
    for layer in layers:
        others = frozenset(layers) - {layer}
        variant = apply_recipe(recipe, model, example, device, skip_modules=others)
        out = run_outputs(variant, data, rows=rows).double()
        scores.append((layer, float((out - ref).norm() / ref.norm().clamp_min(1e-30))))
        del variant
    return sorted(scores, key=lambda item: -item[1])


def fallback(
    recipe: Recipe,
    model: LoadedModel,
    data: EvalData,
    reference: torch.Tensor,
    budget: Budget,
    device: str,
    max_attempts: int = 3,
) -> Fallback:
    """Keep the 1, 2, 4, ... most sensitive layers in higher precision until the variant passes or attempts
    run out."""
    scores = layer_scores(recipe, model, data, reference, device)
    variant, quality, kept = None, None, ()
    example = data.rows(slice(0, 2))
    for attempt in range(1, max_attempts + 1):
        count = min(2 ** (attempt - 1), len(scores) - 1)
        if count < 1:
            break
        kept = tuple(name for name, _ in scores[:count])
        try:
            variant = apply_recipe(recipe, model, example, device, skip_modules=frozenset(kept))
        except InferforgeError:
            break
        quality = evaluate(variant, data, model.task, reference, budget)
        if quality.passed:
            return Fallback(tuple(scores), kept, attempt, variant, quality)
    return Fallback(tuple(scores), kept, max_attempts, None, quality)
