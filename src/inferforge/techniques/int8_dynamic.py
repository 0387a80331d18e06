"""int8 weights and int8 activations quantized per token at run time (torchao W8A8 dynamic).

Uses int8 tensor-core matmuls, so it can win at large batches where bf16 matmuls are compute-bound; the
per-token quantization costs extra passes. On CUDA torchao's kernel fails for fewer than 17 rows: the quality
stage records that as a failed candidate rather than shipping it.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques._torchao import no_linears_reason, quantize_linears
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class Int8Dynamic(TechniqueConfig):
    """int8 x int8 matmuls with per-token activation scales and per-channel weight scales."""

    name = "int8_dynamic"
    kind = "quantization"

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        return no_linears_reason(model)

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return quantize_linears(module, Int8DynamicActivationInt8WeightConfig(), ctx, self.name)
