"""A batch-1 decode layer's MLP (gate/up, then down) in one launch: down starts on each slice of SiLU x up as
soon as the gate/up programs that write it are done, instead of after a kernel boundary.

Why: at batch 1 every kernel boundary of the decode chain costs a few microseconds that no weight streams
through, and int8's down product (K = 8,192: 256 programs walking 4 tiles each) read its 16.8 MB at 1.77 TB/s
where gate/up's 2,048 one-tile programs reach 2.73 (H4 of 2026-11-23); int8's down took as long as a bf16
down reading twice its bytes (Q10 of 2026-11-24). Here down runs as one-tile programs too, split over its K
tiles, each tile of u a "chunk", and its programs are mixed into gate/up's: the grid is gate/up chunk 0,
gate/up chunk 1, down chunk 0, gate/up chunk 2, down chunk 1, ... A down program loads its weight tile at
once, waits until the chunk's gate/up programs have counted themselves done, then reads its slice of u; the
last of a row block's down programs sums the partials in chunk order (`gemv._split_sum`), scales, adds the
residual and stores. The sums are the ones the two `gemv` calls make, in the same order.

A down program only waits for programs of lower index. The hardware starts a grid's programs in index order
(CUB's single-pass scan, decoupled look-back, relies on the same), so every program waited for has started
and runs to its end: no deadlock whatever the grid's size. Counters go back to zero within the launch (the
last down program to pass its wait resets them), so a CUDA graph replays it as it is.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferforge.llm import fused
from inferforge.llm.gemv import (
    INT8_PRE,
    TileConfig,
    _int8_mode,
    _rows,
    _split_sum,
    _store,
    _store_residual,
    _wait_for_inputs,
    _weights_f32,
    tiles_for,
)

# The fused MLP in the batch-1 decode step (`decode_gemv.mlp`), by weight kind; off until measured faster
# in the step on the device.
FUSED_MLP = {"int8": False, "bf16": False}
# How down runs inside it: "split" one K tile a program, mixed into gate/up's programs, the partials summed by
# the row block's last (the module docstring); "rows" `gemv`'s own down programs (a row block over all of K)
# after every gate/up program, each K tile taken once its chunk is done.
DOWN_LAYOUT = {"layout": "split"}


@triton.jit
def _item(pid, GUC: tl.constexpr, DC: tl.constexpr, CH: tl.constexpr):
    """Program `pid`'s work: (is a gate/up program, chunk, index within the chunk), for the grid order
    gate/up 0, gate/up 1, down 0, gate/up 2, down 1, ..., gate/up CH-1, down CH-2, down CH-1."""
    P: tl.constexpr = GUC + DC
    first = pid < GUC
    t = tl.maximum(pid - GUC, 0)
    j = t // P
    r = t % P
    last = j >= CH - 1
    gu = first | ((j < CH - 1) & (r < GUC))
    chunk = tl.where(first, 0, tl.where(gu, j + 1, j))
    idx = tl.where(first, pid, tl.where(gu | last, r, r - GUC))
    return gu, chunk, idx


@triton.jit
def _gate_up(X, G, W, SCALE, U, SYNC, chunk, idx, eps, stride_w, INTER: tl.constexpr, H: tl.constexpr,
             GUC: tl.constexpr, BN: tl.constexpr, HAS_SCALE: tl.constexpr, W_MODE: tl.constexpr,
             PDL: tl.constexpr):  # fmt: skip
    """Gate rows j and up rows INTER + j of `gemv`'s SiLU-pair product with its RMSNorm prologue, u stored,
    then the chunk's count of finished gate/up programs raised."""
    HALF: tl.constexpr = BN // 2
    offs_n, j0, _ = _rows(chunk * GUC + idx, BN, 3, INTER, 1)
    offs_k = tl.arange(0, H)
    nmask = offs_n < 2 * INTER
    w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :])
    g = tl.load(G + offs_k).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_n).to(tl.float32)
    _wait_for_inputs(PDL)
    act_ty = X.dtype.element_ty
    xf = tl.load(X + offs_k).to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / H + eps)
    xin = ((xf * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)
    acc = tl.sum(_weights_f32(w, W_MODE) * xin[None, :], 1)
    if HAS_SCALE:
        acc = acc * scale
    _store(acc, X, X, U, offs_n, nmask, j0, 2 * INTER, 3, HALF)
    tl.debug_barrier()  # every thread's u is stored before the count's release
    tl.atomic_add(SYNC + chunk, 1, sem="release", scope="gpu")


@triton.jit
def _down(X, W, SCALE, U, PART, CNT, SYNC, Y, chunk, idx, stride_w, INTER: tl.constexpr, H: tl.constexpr,
          GUC: tl.constexpr, DC: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
          HAS_SCALE: tl.constexpr, W_MODE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One K tile (`chunk`) of down's rows `idx * BN ...`: the tile loaded at once, u's slice read once the
    chunk's gate/up programs are all done; the row block's last tile sums, scales, adds the residual."""
    offs_n = idx * BN + tl.arange(0, BN)
    offs_k = chunk * BK + tl.arange(0, BK)
    nmask = offs_n < H
    w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :])
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_n).to(tl.float32)
    _wait_for_inputs(PDL)
    res = tl.load(X + offs_n).to(tl.float32)  # the residual is the MLP's input: the previous kernel's output
    while tl.atomic_add(SYNC + chunk, 0, sem="acquire", scope="gpu") < GUC:
        pass
    tl.debug_barrier()
    u = tl.load(U + offs_k, cache_modifier=".cg").to(tl.float32)  # other SMs wrote it: past L1
    acc = tl.sum(_weights_f32(w, W_MODE) * u[None, :], 1)
    acc, last = _split_sum(acc, PART, CNT, idx, chunk, offs_n, nmask, H, CH)
    if HAS_SCALE:
        acc = acc * scale
    _store_residual(acc, res, Y, offs_n, nmask & last, X.dtype.element_ty)
    passed = tl.atomic_add(SYNC + CH, 1, sem="acq_rel", scope="gpu")
    if passed == CH * DC - 1:  # every down program has left its wait: the counts go back to zero
        for c in tl.static_range(0, CH + 1):
            tl.store(SYNC + c, 0)


@triton.jit
def _down_rows(X, W, SCALE, U, SYNC, Y, idx, stride_w, INTER: tl.constexpr, H: tl.constexpr,
               GUC: tl.constexpr, DC: tl.constexpr, CH: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               HAS_SCALE: tl.constexpr, W_MODE: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Down's rows `idx * BN ...` over all of K, as `gemv`'s down program walks it (the next tile loaded
    before this one's product), each K tile once its chunk's gate/up programs are all done."""
    offs_n = idx * BN + tl.arange(0, BN)
    offs_k = tl.arange(0, BK)
    rows = W + offs_n[:, None].to(tl.int64) * stride_w
    w = tl.load(rows + offs_k[None, :])
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_n).to(tl.float32)
    _wait_for_inputs(PDL)
    res = tl.load(X + offs_n).to(tl.float32)
    acc = tl.zeros([BN], tl.float32)
    for c in tl.static_range(0, CH):
        if c + 1 < CH:
            w_next = tl.load(rows + (c + 1) * BK + offs_k[None, :])
        while tl.atomic_add(SYNC + c, 0, sem="acquire", scope="gpu") < GUC:
            pass
        tl.debug_barrier()
        u = tl.load(U + c * BK + offs_k, cache_modifier=".cg").to(tl.float32)
        acc += tl.sum(_weights_f32(w, W_MODE) * u[None, :], 1)
        if c + 1 < CH:
            w = w_next
    if HAS_SCALE:
        acc = acc * scale
    _store_residual(acc, res, Y, offs_n, offs_n < H, X.dtype.element_ty)
    passed = tl.atomic_add(SYNC + CH, 1, sem="acq_rel", scope="gpu")
    if passed == DC - 1:  # every down program has left its last wait: the counts go back to zero
        for c in tl.static_range(0, CH + 1):
            tl.store(SYNC + c, 0)


@triton.jit
def _mlp_kernel(X, G, WGU, SGU, WD, SD, U, PART, CNT, SYNC, Y, eps, stride_gu, stride_d, INTER: tl.constexpr,
                H: tl.constexpr, BN_GU: tl.constexpr, BN_D: tl.constexpr, BK_D: tl.constexpr,
                HAS_SCALE: tl.constexpr, W_MODE: tl.constexpr, PDL: tl.constexpr,
                SPLIT_DOWN: tl.constexpr):  # fmt: skip
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    CH: tl.constexpr = INTER // BK_D  # down's K tiles: the chunks of u
    GUC: tl.constexpr = BK_D // (BN_GU // 2)  # gate/up programs a chunk
    DC: tl.constexpr = H // BN_D  # down programs a chunk
    if SPLIT_DOWN:
        gu, chunk, idx = _item(tl.program_id(0), GUC, DC, CH)
    else:  # every gate/up program first, then down's row blocks over all of K
        pid = tl.program_id(0)
        gu = pid < CH * GUC
        chunk = pid // GUC
        idx = tl.where(gu, pid % GUC, pid - CH * GUC)
    if gu:
        _gate_up(
            X, G, WGU, SGU, U, SYNC, chunk, idx, eps, stride_gu, INTER, H, GUC, BN_GU, HAS_SCALE, W_MODE, PDL
        )
    elif SPLIT_DOWN:
        _down(X, WD, SD, U, PART, CNT, SYNC, Y, chunk, idx, stride_d, INTER, H, GUC, DC, CH, BN_D, BK_D,
              HAS_SCALE, W_MODE, PDL)  # fmt: skip
    else:
        _down_rows(X, WD, SD, U, SYNC, Y, idx, stride_d, INTER, H, GUC, DC, CH, BN_D, BK_D, HAS_SCALE,
                   W_MODE, PDL)  # fmt: skip


# (device, dtype, H, INTER, BN_D) -> (u, partials, arrival counts per row block, chunk counts + down count);
# shared by the layers of a step, which run one after another; every count is back at zero after a launch.
_SCRATCH: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _scratch(x: torch.Tensor, hidden: int, inter: int, bn_d: int, chunks: int) -> tuple[torch.Tensor, ...]:
    key = (x.device, x.dtype, hidden, inter, bn_d)
    if key not in _SCRATCH:
        dev = x.device
        _SCRATCH[key] = (
            torch.empty(inter, dtype=x.dtype, device=dev),
            torch.empty(chunks, hidden, dtype=torch.float32, device=dev),
            torch.zeros(hidden // bn_d, dtype=torch.int32, device=dev),
            torch.zeros(chunks + 1, dtype=torch.int32, device=dev),
        )
    return _SCRATCH[key]


def tiles(weight_gu: torch.Tensor, weight_down: torch.Tensor) -> tuple[TileConfig, TileConfig]:
    """`gemv`'s own tiles for the two products (gate/up with its norm prologue and SiLU pairs, down), so
    that the sums are the same."""
    two_i, hidden = weight_gu.shape
    elem, int8 = weight_gu.element_size(), weight_gu.dtype == torch.int8
    gu = tiles_for(two_i, hidden, elem, int8=int8)
    if gu.block_k < hidden:  # `gemv`'s rule for a norm prologue: the whole row in one tile
        gu = TileConfig(max(2, 32768 // (triton.next_power_of_2(hidden) * elem)), hidden, 4)
    gu = TileConfig(max(2, gu.block_n), gu.block_k, gu.num_warps)
    return gu, tiles_for(hidden, two_i // 2, elem, int8=int8)


def supported(x: torch.Tensor, weight_gu: torch.Tensor, weight_down: torch.Tensor) -> bool:
    """Whether `mlp` runs these operands with `gemv`'s arithmetic: float weights, or int8 in the mode
    `gemv` takes after its wait (no pre-converted tiles); shapes whose tiles divide them exactly."""
    if weight_gu.dtype != weight_down.dtype or x.shape[0] != 1:
        return False
    if weight_gu.dtype == torch.int8:
        if INT8_PRE.get("gate_up") or INT8_PRE.get("down") or _int8_mode(x) not in (3, 5, 6):
            return False
    elif weight_gu.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    two_i, hidden = weight_gu.shape
    inter = two_i // 2
    if weight_down.shape != (hidden, inter) or hidden != triton.next_power_of_2(hidden):
        return False
    gu, down = tiles(weight_gu, weight_down)
    return (
        gu.block_k == hidden
        and gu.num_warps == down.num_warps
        and inter % down.block_k == 0
        and down.block_k % (gu.block_n // 2) == 0
        and hidden % down.block_n == 0
    )


def mlp(
    x: torch.Tensor,
    weight_gu: torch.Tensor,
    weight_down: torch.Tensor,
    *,
    norm_weight: torch.Tensor,
    eps: float,
    scale_gu: torch.Tensor | None = None,
    scale_down: torch.Tensor | None = None,
) -> torch.Tensor:
    """x + down(SiLU(gate) x up of rmsnorm(x)) for one row x [1, H], as
    `gemv(gemv(x, weight_gu, norm_weight=..., silu_pair=True), weight_down, residual=x)` computes it.
    `weight_gu` [2I, H] holds gate rows then up rows; `weight_down` [H, I]; int8 weights take their
    per-row scales."""
    if not supported(x, weight_gu, weight_down):
        raise ValueError(
            f"mlp cannot run x {tuple(x.shape)} {x.dtype} with weights {weight_gu.dtype} "
            f"{tuple(weight_gu.shape)} / {tuple(weight_down.shape)}"
        )
    if (scale_gu is None) != (weight_gu.dtype != torch.int8) or (scale_down is None) != (scale_gu is None):
        raise ValueError("int8 weights take both scales, float weights none")
    hidden, inter = weight_down.shape
    gu, down = tiles(weight_gu, weight_down)
    chunks = inter // down.block_k
    u, part, count, sync = _scratch(x, hidden, inter, down.block_n, chunks)
    y = torch.empty(1, hidden, dtype=x.dtype, device=x.device)
    split = DOWN_LAYOUT["layout"] == "split"
    down_programs = hidden // down.block_n * (chunks if split else 1)
    grid = chunks * down.block_k // (gu.block_n // 2) + down_programs
    w_mode = _int8_mode(x) if weight_gu.dtype == torch.int8 else 0
    has_scale = scale_gu is not None
    _mlp_kernel[(grid,)](
        x, norm_weight, weight_gu, scale_gu if has_scale else x, weight_down, scale_down if has_scale else x,
        u, part, count, sync, y, eps, weight_gu.stride(0), weight_down.stride(0), INTER=inter, H=hidden,
        BN_GU=gu.block_n, BN_D=down.block_n, BK_D=down.block_k, HAS_SCALE=has_scale, W_MODE=w_mode,
        PDL=fused.pdl_on(), SPLIT_DOWN=split, num_warps=gu.num_warps, **fused.launch_options(),
    )  # fmt: skip
    return y
