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

__all__ = ["L2_PREFETCH", "RopeCache", "can_run", "linear", "operands", "prefetch_plan"]

# Which later weights each batch-1 product of a layer fetches into L2 before its wait (`gemv`'s `prefetch`),
# by product: (target, fraction of the target's bytes), targets "o", "gate_up", "down" of the same layer and
# "next_qkv" (the next layer's q/k/v, or the LM head after the last layer). The idea (CUTLASS's "GEMM with L2
# weight prefetch"): the narrow products and the attention leave DRAM idle for a moment, gate/up then reads
# its first programs' weights from L2. Measured (R2-R5 of 2026-11-24, batch-1 graphs, in turn): o fetching
# 10% of gate/up, int8 612-618 us against 625-627 in three calls, bf16 945-949 against 954-961 in two; 5%
# and 20% gained less, the whole of gate/up (33.5 MB) cost 30-34 us, and so did every fetch issued during a
# product that streams at bandwidth (q/k/v fetching gate/up or o, gate/up fetching down, down fetching the
# next q/k/v: +10 to +45 us). At batches of 64 the same fetches from a side stream between cuBLAS's products
# changed nothing (1,603-1,643 us a step either way; removed, in history at 6e3703c).
L2_PREFETCH: dict[str, tuple[tuple[str, float], ...]] = {
    "qkv": (),
    "o": (("gate_up", 0.1),),
    "gate_up": (),
    "down": (),
}


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


def weight_ranges(module: torch.nn.Module, fraction: float, paired: bool) -> tuple[tuple[int, int], ...]:
    """The device byte ranges of the first `fraction` of a layer's weight in the order its programs read it:
    from the start, or from the start of each half for gate/up (`paired`: a program reads gate row j and up
    row j + N/2). int4 layers ([K/8, N] words, every program reading from K = 0): the first `fraction` of
    their words and of their scales. () for weights that are not one dense block."""
    ops = operands(module)
    weight = None if ops is None else ops[0]
    if isinstance(weight, gemv_int4.Int4Weight) and fraction > 0:  # [K/8, N] words: every program's first K
        return tuple(
            (t.data_ptr(), int(t.numel() * t.element_size() * min(fraction, 1.0)) // 16 * 16)
            for t in (weight.packed, weight.scales)
            if t.is_contiguous()
        )
    if not isinstance(weight, torch.Tensor) or not weight.is_contiguous() or fraction <= 0:
        return ()
    total = weight.numel() * weight.element_size()
    start = weight.data_ptr()
    if not paired:
        return ((start, int(total * min(fraction, 1.0)) // 16 * 16),)
    half = total // 2
    n = int(half * min(fraction, 1.0)) // 16 * 16
    return ((start, n), (start + half, n))


def prefetch_plan(layers: dict[str, torch.nn.Module]) -> dict[str, tuple[tuple[int, int], ...]]:
    """`L2_PREFETCH` as byte ranges for one layer's products, given the target layers by name."""
    plan: dict[str, tuple[tuple[int, int], ...]] = {}
    for product, targets in L2_PREFETCH.items():
        ranges: tuple[tuple[int, int], ...] = ()
        for target, fraction in targets:
            got = weight_ranges(layers[target], fraction, paired=target == "gate_up")
            ranges += tuple(r for r in got if r[1] > 0)
        plan[product] = ranges[:2]
    return plan


def linear(
    x: torch.Tensor, module: torch.nn.Module, prefetch: tuple[tuple[int, int], ...] = (), **kw: object
) -> torch.Tensor:
    """`gemv` (or `gemv_int4.gemv_int4` for int4) with a layer's own weight, scale and bias (`operands`);
    `prefetch` as `gemv`'s (the tensor-core int4 kernel takes none)."""
    ops = operands(module)
    assert ops is not None, f"gemv cannot run {type(module).__name__}"
    weight, scale, bias = ops
    if not isinstance(weight, torch.Tensor):
        if cuda_int4.usable(weight, x, bias, kw):  # its measured winners (`cuda_int4.choice`)
            return cuda_int4.gemv_int4_tc(x, weight, **kw)  # type: ignore[arg-type]
        return gemv_int4.gemv_int4(x, weight, bias=bias, prefetch=prefetch, **kw)  # type: ignore[arg-type]
    return gemv(x, weight, scale=scale, bias=bias, prefetch=prefetch, **kw)  # type: ignore[arg-type]
