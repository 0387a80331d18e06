"""int4 group-wise weights with bf16 activations, through PyTorch's tinygemm kernel (torchao tile-packed
format).

A quarter of bf16's weight bytes: for memory-bound batch-1 work. torchao's default int4 format needs a package
that is not to be had here, so the tile-packed format (CUDA, bf16) is used; torchao 0.18 has no CPU int4 path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques._torchao import no_linears_reason, quantize_linears
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class Int4Weight(TechniqueConfig):
    """Asymmetric int4 weights in groups of `group_size` input channels."""

    name = "int4_weight"
    kind = "quantization"
    group_size: int = 128

    def __post_init__(self) -> None:
        if self.group_size not in (32, 64, 128, 256):
            raise ValueError(f"group_size must be 32, 64, 128 or 256, got {self.group_size}")

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        if not ctx.is_cuda:
            return "torchao 0.18 has int4 weight-only kernels for CUDA only"
        if ctx.compute_dtype != torch.bfloat16:
            return "the tinygemm int4 kernel needs bf16 activations: add bf16 to the recipe"
        return no_linears_reason(model, multiple=max(self.group_size, 16))

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        from torchao.quantization import Int4WeightOnlyConfig

        config = Int4WeightOnlyConfig(group_size=self.group_size, int4_packing_format="tile_packed_to_4d")
        return quantize_linears(module, config, ctx, self.name, multiple=max(self.group_size, 16))
