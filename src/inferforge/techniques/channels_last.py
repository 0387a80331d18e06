"""NHWC memory layout for convolutional models: what cuDNN's tensor-core convolutions read without
transposes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


@register
@dataclass(frozen=True)
class ChannelsLast(TechniqueConfig):
    """Weights and 4-D inputs in channels-last order."""

    name = "channels_last"
    kind = "layout"

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        if not any(isinstance(m, nn.Conv2d) for m in model.module.modules()):
            return "the model has no 2-D convolutions"
        if not any(t.dim() == 4 for t in ctx.example_inputs):
            return "no input is 4-D (N, C, H, W): the convolutions would see a reshaped input anyway"
        return None

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        ctx.channels_last_inputs = True
        return module.to(memory_format=torch.channels_last)
