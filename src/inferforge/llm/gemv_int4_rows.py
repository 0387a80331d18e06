"""Batch-1 decode GEMV for int4 weights in a row-major copy: each output row's packed words contiguous in K.

gemlite packs int4 over K and transposes (`W_q` [K/8, N]), the layout its tensor-core kernels want for larger
batches. Read in place at batch 1 (`gemv_int4`), a program of 8 output rows gets one 32-byte sector from each
of 256 packed rows 4*N bytes apart: Nsight Compute (2026-11-23, run L3) read its gate/up product at 28% of
DRAM peak (20 us for 18.8 MB, where int8's row-major gate/up took 15.8 us for 33.5 MB at 67%) and its LM
head at 43%. This kernel reads a copy laid out as `gemv`'s int8 weights are, [N, K/8] int32 (word c of row n
holds weights 8c .. 8c+7 of that row, nibble i weight 8c+i, the same words gemlite stores, transposed), with
the group scales and zeros [N, K/group]; its loads are whole rows of a tile, like the int8 kernel's.

The copy costs the int4 bytes a second time (gemlite's layout stays for batches over 1): ~0.7 GB on the 1.2B
shape, so an int4 engine holds ~1.4 GB of weights against bf16's 2.47 GB. `decode_gemv.attach_int4_rows`
makes it; the engine keeps it only where `gemv_check` found it equal to the layer's own forward.

Arithmetic as `gemv_int4`: nibble plane i of a tile multiplies x[8c + i] (x read as 8 strided planes), the
products are summed per group and the group's scale and zero applied once:
sum_k W x = sum_g s_g (sum q x) + z_g (sum x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.llm import fused
from inferforge.llm.gemv import (
    NORM,
    PLAIN,
    RESIDUAL_BEFORE_WAIT,
    RopeCache,
    TileConfig,
    _rope_cache_store,
    _rope_prefetch,
    _rows,
    _store,
    _store_residual,
    _wait_for_inputs,
)
from inferforge.llm.gemv_int4 import PTX_NIBBLES, Int4Weight, _nibble, _nibbles_ptx, _outputs


@dataclass(frozen=True)
class Int4Rows:
    """An int4 layer's weights row-major: packed [N, K/8] int32, scales and zeros [N, K/group]."""

    packed: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group: int
    fma: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K), as a [N, K] weight's."""
        return self.packed.shape[0], self.packed.shape[1] * 8


def from_gemlite(weight: Int4Weight) -> Int4Rows:
    """The row-major copy of a gemlite int4 layer's tensors (`gemv_int4.Int4Weight`): the same words and
    values, transposed and made contiguous."""
    return Int4Rows(
        weight.packed.t().contiguous(), weight.scales.t().contiguous(), weight.zeros.t().contiguous(),
        weight.group, weight.fma,
    )  # fmt: skip


@triton.jit
def _planes(X, k0, offs_c, K: tl.constexpr):
    """x[k0 + 8c + i] for i = 0 .. 7, each [KP] in fp32: what nibble plane i of packed column c multiplies."""
    p = X + k0 + offs_c * 8
    m = k0 + offs_c * 8 < K
    x0 = tl.load(p, mask=m, other=0.0).to(tl.float32)
    x1 = tl.load(p + 1, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(p + 2, mask=m, other=0.0).to(tl.float32)
    x3 = tl.load(p + 3, mask=m, other=0.0).to(tl.float32)
    x4 = tl.load(p + 4, mask=m, other=0.0).to(tl.float32)
    x5 = tl.load(p + 5, mask=m, other=0.0).to(tl.float32)
    x6 = tl.load(p + 6, mask=m, other=0.0).to(tl.float32)
    x7 = tl.load(p + 7, mask=m, other=0.0).to(tl.float32)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _normed(x, g, inv, act_ty: tl.constexpr):
    """One plane of RMSNorm(x) * g with transformers' rounding (to the activation type twice)."""
    return ((x * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)


@triton.jit
def _norm_planes(xs, gs, eps, K: tl.constexpr, act_ty: tl.constexpr):
    """RMSNorm over the whole row, which the 8 planes hold together (the wrapper makes BLOCK_K >= K)."""
    ss = tl.sum(xs[0] * xs[0], 0)
    for i in tl.static_range(1, 8):
        ss += tl.sum(xs[i] * xs[i], 0)
    inv = tl.rsqrt(ss / K + eps)
    return (
        _normed(xs[0], gs[0], inv, act_ty), _normed(xs[1], gs[1], inv, act_ty),
        _normed(xs[2], gs[2], inv, act_ty), _normed(xs[3], gs[3], inv, act_ty),
        _normed(xs[4], gs[4], inv, act_ty), _normed(xs[5], gs[5], inv, act_ty),
        _normed(xs[6], gs[6], inv, act_ty), _normed(xs[7], gs[7], inv, act_ty),
    )  # fmt: skip


@triton.jit
def _load_tile(rows_w, S, Z, t, offs_n, nmask, offs_c, stride_s, stride_z, K: tl.constexpr,
               GROUP: tl.constexpr, BLOCK_K: tl.constexpr, TG: tl.constexpr):  # fmt: skip
    """K tile t: packed words [BLOCK_N, BLOCK_K/8] (each row contiguous) and the scales and zeros of its TG
    groups [BLOCK_N, TG] (one group when a group spans several tiles)."""
    KP: tl.constexpr = BLOCK_K // 8
    c = t * KP + offs_c
    w = tl.load(rows_w + c[None, :], mask=nmask[:, None] & (c < K // 8)[None, :], other=0)
    g = (t * BLOCK_K + tl.arange(0, TG) * (BLOCK_K // TG)) // GROUP
    gmask = nmask[:, None] & (g < K // GROUP)[None, :]
    rows_s = offs_n[:, None].to(tl.int64)
    s = tl.load(S + rows_s * stride_s + g[None, :], mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(Z + rows_s * stride_z + g[None, :], mask=gmask, other=0.0).to(tl.float32)
    return w, s, z


@triton.jit
def _tile_dot(w, s, z, xs, TG: tl.constexpr, FMA: tl.constexpr, PTX: tl.constexpr):
    """sum_k W[n, k] x[k] over one tile [BLOCK_N, KP]: nibble plane i times x plane i, summed per group,
    the group's scale and zero applied once (PTX: the planes by `gemv_int4._nibbles_ptx`)."""
    BN: tl.constexpr = w.shape[0]
    KP: tl.constexpr = w.shape[1]
    if PTX:
        planes = _nibbles_ptx(w)
        t = planes[0] * xs[0][None, :]
        xsum = xs[0]
        for i in tl.static_range(1, 8):
            t += planes[i] * xs[i][None, :]
            xsum += xs[i]
    else:
        t = _nibble(w, 0) * xs[0][None, :]
        xsum = xs[0]
        for i in tl.static_range(1, 8):
            t += _nibble(w, i) * xs[i][None, :]
            xsum += xs[i]
    tg = tl.sum(tl.reshape(t, [BN, TG, KP // TG]), 2)
    xg = tl.sum(tl.reshape(xsum, [TG, KP // TG]), 1)[None, :]
    if FMA:
        return tl.sum(tg * s + z * xg, 1)
    else:
        return tl.sum((tg - z * xg) * s, 1)


@triton.jit
def _gemv_int4_rows_kernel(X, G, W, S, Z, BIAS, R, Y, N, stride_w, stride_s, stride_z, eps, COS, SIN, POS,
                           SLOT, KC, VC, stride_c_slot, K: tl.constexpr, GROUP: tl.constexpr,
                           FMA: tl.constexpr, PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr,
                           HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           TG: tl.constexpr, PAIR_GAP: tl.constexpr, H: tl.constexpr, KV: tl.constexpr,
                           D: tl.constexpr, PDL: tl.constexpr, PTX: tl.constexpr, EARLY_RES: tl.constexpr,
                           EARLY: tl.constexpr):  # fmt: skip
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    offs_n, j0, head = _rows(pid, BLOCK_N, EPILOGUE, PAIR_GAP, D)
    nmask = offs_n < N
    offs_c = tl.arange(0, BLOCK_K // 8)
    rows_w = W + offs_n[:, None].to(tl.int64) * stride_w
    w, s, z = _load_tile(rows_w, S, Z, 0, offs_n, nmask, offs_c, stride_s, stride_z, K, GROUP, BLOCK_K, TG)
    # Before the wait: everything no kernel of this step writes (as `gemv._gemv_kernel`).
    if PROLOGUE == 1:
        gs = _planes(G, 0, offs_c, K)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        j, slot, c1, c2, s1, s2 = _rope_prefetch(pid, POS, SLOT, COS, SIN, BLOCK_N, D)
    if EPILOGUE == 1 and EARLY_RES:  # `gemv.RESIDUAL_BEFORE_WAIT` says why this may come before the wait
        res = tl.load(R + offs_n, mask=nmask, other=0.0).to(tl.float32)
    _wait_for_inputs(PDL)  # everything below may read the previous kernel's output
    act_ty = X.dtype.element_ty
    if PROLOGUE == 1:
        xin = _norm_planes(_planes(X, 0, offs_c, K), gs, eps, K, act_ty)
        acc = _tile_dot(w, s, z, xin, TG, FMA, PTX)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for t in tl.static_range(0, TILES):
            if EARLY and t + 1 < TILES:  # the next tile's loads go out before this tile's product
                w2, s2_, z2 = _load_tile(rows_w, S, Z, t + 1, offs_n, nmask, offs_c, stride_s, stride_z, K,
                                         GROUP, BLOCK_K, TG)  # fmt: skip
            acc += _tile_dot(w, s, z, _planes(X, t * BLOCK_K, offs_c, K), TG, FMA, PTX)
            if t + 1 < TILES:
                if EARLY:
                    w, s, z = w2, s2_, z2
                else:
                    w, s, z = _load_tile(rows_w, S, Z, t + 1, offs_n, nmask, offs_c, stride_s, stride_z, K,
                                         GROUP, BLOCK_K, TG)  # fmt: skip
    if HAS_BIAS:
        acc = acc + bias
    if EPILOGUE == 2:
        _rope_cache_store(acc.to(act_ty).to(tl.float32), head, j, c1, c2, s1, s2, slot, Y, KC, VC,
                          stride_c_slot, HALF, H, KV, D)  # fmt: skip
    elif EPILOGUE == 1 and EARLY_RES:
        _store_residual(acc, res, Y, offs_n, nmask, act_ty)
    else:
        _store(acc, X, R, Y, offs_n, nmask, j0, N, EPILOGUE, HALF)


# Issue the next K tile's loads before this tile's product (down: K = 8,192 in 4 tiles).
EARLY_NEXT_TILE = {"on": True}
# Keyed by (N, K); empty until measured inside the decode step.
TUNED: dict[tuple[int, int], TileConfig] = {}


def default_tiles(n: int, k: int) -> TileConfig:
    """8 KB of packed words a tile: 16 rows of 1,024 weights (512 bytes a row, a warp's 16-byte loads side by
    side), 8 rows of 2,048 where the norm prologue needs the whole row in one tile."""
    return TileConfig(16, min(triton.next_power_of_2(k), 1024), 4)


def gemv_int4_rows(
    x: torch.Tensor,
    weight: Int4Rows,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope_cache: RopeCache | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """`gemv.gemv` (same arguments, results and errors) for a row-major int4 weight; `tiles.block_k` counts
    weights (unpacked) and must be a power of two of at least 8."""
    n, k = weight.shape
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got {x.shape[0]}")
    cfg = tiles or TUNED.get((n, k)) or default_tiles(n, k)
    if norm_weight is not None and cfg.block_k < k:
        kk = triton.next_power_of_2(k)
        cfg = TileConfig(max(2, cfg.block_n * cfg.block_k // kk), kk, cfg.num_warps)
    if cfg.block_k < 8 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 8, got {cfg.block_k}")
    y, epilogue, gap, cfg, cache_args, (heads, kv_heads, d) = _outputs(
        x, n, cfg, residual is not None, rope_cache, silu_pair, out_dtype
    )
    grid = triton.cdiv(n // 2, cfg.block_n // 2) if silu_pair else triton.cdiv(n, cfg.block_n)
    tg = max(cfg.block_k // weight.group, 1)
    w = weight
    _gemv_int4_rows_kernel[(grid,)](
        x, norm_weight if norm_weight is not None else x, w.packed, w.scales, w.zeros,
        bias if bias is not None else x, residual if residual is not None else x, y, n, w.packed.stride(0),
        w.scales.stride(0), w.zeros.stride(0), eps, *cache_args, K=k, GROUP=w.group, FMA=w.fma,
        PROLOGUE=PLAIN if norm_weight is None else NORM, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, TG=tg, PAIR_GAP=gap, H=heads, KV=kv_heads, D=d,
        PDL=fused.pdl_on(), PTX=PTX_NIBBLES["on"] and x.is_cuda,
        EARLY_RES=RESIDUAL_BEFORE_WAIT["on"] and fused.pdl_on() != 2, EARLY=EARLY_NEXT_TILE["on"],
        num_warps=cfg.num_warps, **fused.launch_options(),
    )  # fmt: skip
    return y
