"""fp8 (e4m3) weights and dynamically quantized activations with per-row scales (torchao), for Hopper and Ada.

fp8 matmuls run at about twice bf16's rate on an H100; the per-row scaling keeps outliers in one row from
crushing the rest. Needs bf16 activations and compute capability 8.9 or newer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques._torchao import cuda_capability, no_linears_reason, quantize_linears
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class FP8Dynamic(TechniqueConfig):
    """Float8 dynamic activation, float8 weight, per-row granularity."""

    name = "fp8"
    kind = "quantization"

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        if cuda_capability(ctx) < (8, 9):
            return "fp8 matmuls need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper)"
        if ctx.compute_dtype != torch.bfloat16:
            return "fp8 with per-row scales needs bf16 activations: add bf16 to the recipe"
        return no_linears_reason(model)

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
        return quantize_linears(module, config, ctx, self.name)
