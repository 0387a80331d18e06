"""int8 weights, activations in the model's own dtype (torchao `Int8WeightOnlyConfig`).

Halves the bytes of bf16 weights; pays off where moving weights dominates (small batches). In eager mode its
kernels were 3.6x slower than bf16 on an H100 at batch 1, so the benchmark, not this module, decides if it
ships.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques._torchao import no_linears_reason, quantize_linears
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class Int8Weight(TechniqueConfig):
    """Per-channel symmetric int8 weights for every eligible Linear layer."""

    name = "int8_weight"
    kind = "quantization"

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        return no_linears_reason(model)

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        from torchao.quantization import Int8WeightOnlyConfig

        return quantize_linears(module, Int8WeightOnlyConfig(), ctx, self.name)
