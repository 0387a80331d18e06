"""Shared plumbing for torchao-based quantization techniques (not a technique itself)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from inferforge.errors import NotApplicable
from inferforge.models.loaded import LoadedModel
from inferforge.techniques.base import ApplyContext


def quantizable_linears(module: nn.Module, multiple: int = 16) -> list[str]:
    """Names of Linear layers whose shapes the quantized kernels accept."""
    return [
        name
        for name, m in module.named_modules()
        if isinstance(m, nn.Linear) and m.in_features % multiple == 0 and m.out_features % multiple == 0
    ]


def no_linears_reason(model: LoadedModel, multiple: int = 16) -> str | None:
    if quantizable_linears(model.module, multiple):
        return None
    return (
        f"the model has no Linear layer with sizes divisible by {multiple} (convolutions are not quantized)"
    )


def quantize_linears(
    module: nn.Module, config: Any, ctx: ApplyContext, label: str, multiple: int = 16
) -> nn.Module:
    """Quantize every eligible Linear except the ones the sensitivity fallback keeps in higher precision."""
    from torchao.quantization import quantize_

    eligible = set(quantizable_linears(module, multiple))
    chosen = sorted(eligible - ctx.skip_modules)
    if not chosen:
        raise NotApplicable(f"{label}: every eligible Linear layer is kept in higher precision")
    quantize_(module, config, filter_fn=lambda m, fqn: fqn in chosen)
    kept = sorted(eligible & ctx.skip_modules)
    ctx.notes.append(f"{label}: {len(chosen)} Linear layers quantized" + (f", kept {kept}" if kept else ""))
    return module


def cuda_capability(ctx: ApplyContext) -> tuple[int, int]:
    return torch.cuda.get_device_capability(ctx.device) if ctx.is_cuda else (0, 0)
