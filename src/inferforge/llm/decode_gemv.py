"""The products of a batch-1 decode step: which kernel reads which layer, on the layer's own bytes.

Float `nn.Linear` and gemlite's 8-bit channel-wise layers go to `gemv.gemv`, gemlite's packed int4 layers to
`gemv_int4.gemv_int4` (gate/up, down and the LM head to `cuda_int4` once it is built and checked on the
device); the model calls `linear` (and builds a `RopeCache`) without knowing which. This module sits above
the kernels so none imports another's dispatch.
"""

from __future__ import annotations

import torch

from inferforge.llm import cuda_int4, gemv_int4
from inferforge.llm.gemv import RopeCache, gemv

__all__ = ["RopeCache", "can_run", "linear", "operands"]


def operands(
    module: torch.nn.Module,
) -> tuple[torch.Tensor | object, torch.Tensor | None, torch.Tensor | None] | None:
    """(weight, per-channel scale or None, bias or None) of a layer this kernel can run: a plain
    floating-point `nn.Linear`, or gemlite's 8-bit channel-wise layers (int8 / fp8 weight-only,
    `llm/quant.py`), whose `W_q` is the transpose of the [N, K] weight and `scales` one value per output
    channel, so the same bytes serve gemlite's kernels at larger batches and this one at batch 1. gemlite's
    packed int4 layers give a `gemv_int4.Int4Weight` (their group scales and zeros inside it) and run through
    `gemv_int4`. None otherwise."""
    if type(module) is torch.nn.Linear:
        return (module.weight, None, module.bias) if module.weight.is_floating_point() else None
    if getattr(module, "W_nbits", None) == 4:
        w4 = gemv_int4.int4_weight(module)
        return None if w4 is None else (w4, None, getattr(module, "bias", None))
    w_q, scales = getattr(module, "W_q", None), getattr(module, "scales", None)
    if getattr(module, "W_nbits", None) != 8 or getattr(module, "elements_per_sample", None) != 1:
        return None
    if not isinstance(w_q, torch.Tensor) or not isinstance(scales, torch.Tensor) or w_q.element_size() != 1:
        return None
    weight = w_q.t()
    n = weight.shape[0]
    if weight.stride(1) != 1 or scales.numel() != n or getattr(module, "zeros", torch.empty(0)).numel():
        return None
    return weight, scales.reshape(n), getattr(module, "bias", None)


def can_run(module: torch.nn.Module, quantized: bool = True) -> bool:
    """Whether `linear` can run the layer; `quantized=False` admits unquantized (float) weights only."""
    ops = operands(module)
    return ops is not None and (quantized or (ops[1] is None and isinstance(ops[0], torch.Tensor)))


def linear(x: torch.Tensor, module: torch.nn.Module, **kw: object) -> torch.Tensor:
    """`gemv` (or `gemv_int4.gemv_int4` for int4) with a layer's own weight, scale and bias (`operands`)."""
    ops = operands(module)
    assert ops is not None, f"gemv cannot run {type(module).__name__}"
    weight, scale, bias = ops
    if not isinstance(weight, torch.Tensor):
        if cuda_int4.usable(weight, x, bias, kw):  # its measured winners (`cuda_int4.choice`)
            return cuda_int4.gemv_int4_tc(x, weight, **kw)  # type: ignore[arg-type]
        return gemv_int4.gemv_int4(x, weight, bias=bias, **kw)  # type: ignore[arg-type]
    return gemv(x, weight, scale=scale, bias=bias, **kw)  # type: ignore[arg-type]
