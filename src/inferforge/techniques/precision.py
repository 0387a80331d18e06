"""Number formats for the whole model: fp32, tf32 matmuls, bf16 and fp16 weights and activations.

Half precision halves the bytes every layer moves and uses the tensor cores; fp16 is refused on CPUs, where it
is emulated and slower, and tf32 only means something on NVIDIA GPUs from Ampere on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class FP32(TechniqueConfig):
    """The reference numbers: full fp32 everywhere."""

    name = "fp32"
    kind = "precision"

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        ctx.compute_dtype = torch.float32
        return module.float()


@register
@dataclass(frozen=True)
class TF32(TechniqueConfig):
    """fp32 storage with tf32 tensor-core matmuls and convolutions (10-bit mantissa inside the product)."""

    name = "tf32"
    kind = "precision"

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        if not ctx.is_cuda:
            return "tf32 needs an NVIDIA GPU"
        if torch.cuda.get_device_capability(ctx.device)[0] < 8:
            return "tf32 needs compute capability 8.0 or newer"
        return None

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        ctx.tf32 = True
        return module.float()


@dataclass(frozen=True)
class _HalfPrecision(TechniqueConfig):
    kind = "precision"
    dtype = torch.bfloat16

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        ctx.compute_dtype = self.dtype
        return module.to(self.dtype)


@register
@dataclass(frozen=True)
class BF16(_HalfPrecision):
    """bfloat16 weights and activations: fp32's range with 8 bits of mantissa."""

    name = "bf16"
    dtype = torch.bfloat16


@register
@dataclass(frozen=True)
class FP16(_HalfPrecision):
    """float16 weights and activations: more mantissa than bf16, but a range that large activations
    overflow."""

    name = "fp16"
    dtype = torch.float16

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        return None if ctx.is_cuda else "fp16 is emulated on CPUs (slower than fp32); use bf16 there"
