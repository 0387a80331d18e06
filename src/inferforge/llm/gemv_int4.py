"""Batch-1 decode GEMV for gemlite's packed int4 weights (`A16Wn`, W_nbits=4), read in place.

gemlite's own int4 kernels are latency-bound at batch 1 on the 1.2B shapes (int4 gained 1.43x over bf16 end
to end where int8, with twice the bytes, gained 1.70x through `gemv.py`). This kernel has `gemv.gemv`'s
contract (RMSNorm prologue; store, residual, RoPE + cache, SiLU-pair epilogues; the first weight tile, its
scales and zeros, the norm weight, bias and cos / sin loaded before `griddepcontrol.wait`) and reads the bytes
gemlite's `GemLiteLinearTriton.pack` leaves (so gemlite keeps them for larger batches and no copy is made):

- `W_q` [K/8, N] int32, contiguous (packed over K, then transposed): weight (n, k) is bits 4*(k % 8) .. +3 of
  `W_q[k // 8, n]`, so a tile of packed rows is read coalesced along N;
- `scales`, `zeros` [K/group, N], contiguous; `W_group_mode` 4 (fma): W = q * scale + zeros, zeros holding
  -zero * scale; 3: W = (q - zero) * scale (gemlite's choice when group_size == K).

A tile of packed rows r holds 8 nibble planes; plane i multiplies x[8r + i], column i of x read as a
[rows, 8] tile (`_row_tile`). The product is summed per
group first and scaled once per group: sum_k W x = sum_g s_g (sum q x) + z_g (sum x). Tiles are 8 output
rows wide (`default_tiles` says why).
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
    RESIDUAL,
    RESIDUAL_BEFORE_WAIT,
    ROPE_CACHE,
    SILU_PAIR,
    STORE,
    RopeCache,
    TileConfig,
    _prefetch_args,
    _rope_cache_store,
    _rope_prefetch,
    _rows,
    _store,
    _store_residual,
    _wait_for_inputs,
)


@dataclass(frozen=True)
class Int4Weight:
    """A gemlite int4 layer's tensors, as stored (see the module docstring)."""

    packed: torch.Tensor  # [K/8, N] int32
    scales: torch.Tensor  # [K/group, N]
    zeros: torch.Tensor  # [K/group, N]: -zero * scale when `fma`, else zero
    group: int
    fma: bool

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K), as a [N, K] weight's."""
        return self.packed.shape[1], self.packed.shape[0] * 8


def int4_weight(module: torch.nn.Module) -> Int4Weight | None:
    """The layer's `Int4Weight` if it has exactly the layout this kernel reads, else None (other bit widths,
    MX formats, channel-wise post-scales, scaled activations, integer zeros, other packings or strides)."""
    w, s, z, group = (getattr(module, a, None) for a in ("W_q", "scales", "zeros", "group_size"))
    if getattr(module, "W_nbits", None) != 4 or getattr(module, "elements_per_sample", None) != 8:
        return None
    mode = getattr(module, "W_group_mode", None)
    if mode not in (3, 4) or getattr(module, "channel_scale_mode", None) != 0:
        return None
    if getattr(module, "scaled_activations", False) or getattr(module, "unpack_mask", 15) != 15:
        return None
    if not all(isinstance(t, torch.Tensor) and t.dim() == 2 and t.stride(1) == 1 for t in (w, s, z)):
        return None
    assert isinstance(w, torch.Tensor) and isinstance(s, torch.Tensor) and isinstance(z, torch.Tensor)
    if w.dtype != torch.int32 or not s.is_floating_point() or not z.is_floating_point():
        return None
    k, n = w.shape[0] * 8, w.shape[1]
    if not isinstance(group, int) or group < 8 or group & (group - 1) or k % group:
        return None
    if s.shape != (k // group, n) or z.shape != s.shape:
        return None
    if (getattr(module, "in_features", k), getattr(module, "out_features", n)) != (k, n):
        return None
    return Int4Weight(w, s, z, group, mode == 4)


@triton.jit
def _row_tile(P, rows, KP: tl.constexpr):
    """P[8 r + i] for the packed rows r as a [rows, 8] fp32 tile: column i is what nibble plane i multiplies.
    One 16-byte load a row (each thread gets whole rows, so `_columns` picks columns in registers), where
    eight strided loads each went through shared memory to reach the weight tile's layout (sm_90, read
    offline)."""
    i8 = tl.arange(0, 8)
    return tl.load(P + rows[:, None] * 8 + i8[None, :], mask=(rows < KP)[:, None], other=0.0).to(tl.float32)


@triton.jit
def _columns(xt):
    """Columns 0..7 of a [rows, 8] tile, split apart (register moves: each thread holds whole rows; a masked
    sum per column cost ~1 add a weight, sm_90 read offline)."""
    R: tl.constexpr = xt.shape[0]
    even, odd = tl.split(tl.reshape(xt, [R, 4, 2]))  # columns 0 2 4 6 / 1 3 5 7
    c04, c26 = tl.split(tl.reshape(even, [R, 2, 2]))
    c15, c37 = tl.split(tl.reshape(odd, [R, 2, 2]))
    c0, c4 = tl.split(c04)
    c2, c6 = tl.split(c26)
    c1, c5 = tl.split(c15)
    c3, c7 = tl.split(c37)
    return c0, c1, c2, c3, c4, c5, c6, c7


@triton.jit
def _load_tile(W, S, Z, t, offs_n, nmask, stride_w, stride_s, stride_z, K: tl.constexpr, GROUP: tl.constexpr,
               BLOCK_K: tl.constexpr, TG: tl.constexpr):  # fmt: skip
    """K tile t: packed weights [BLOCK_K/8, BLOCK_N] and the scales and zeros of its TG groups [TG, BLOCK_N]
    (one group when a group spans several tiles)."""
    rows = t * (BLOCK_K // 8) + tl.arange(0, BLOCK_K // 8)
    wmask = (rows < K // 8)[:, None] & nmask[None, :]
    w = tl.load(W + rows[:, None].to(tl.int64) * stride_w + offs_n[None, :], mask=wmask, other=0)
    g = (t * BLOCK_K + tl.arange(0, TG) * (BLOCK_K // TG)) // GROUP
    gmask = (g < K // GROUP)[:, None] & nmask[None, :]
    s = tl.load(S + g[:, None] * stride_s + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
    z = tl.load(Z + g[:, None] * stride_z + offs_n[None, :], mask=gmask, other=0.0).to(tl.float32)
    return w, s, z


@triton.jit
def _nibble(w, i: tl.constexpr):
    """Nibble plane i in fp32: q | 0x4B000000 is the fp32 2^23 + q (exact), so no int-to-float instruction."""
    return (((w >> (4 * i)) & 15) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _nibbles_ptx(w):
    """All 8 nibble planes of a packed word in fp32, in PTX: two nibbles at a time become fp16 1024 + q by
    bits (one lop3), one packed subtraction makes them q (exact), then one conversion each: ~2.4 instructions
    a weight where `_nibble` takes ~4 and Triton adds sign extensions. (Taking the 1024 off once per group
    instead failed the fp32 tests' 1e-4 tolerance on the H100, run R1 of 2026-11-23: not exact, not done.)"""
    return tl.inline_asm_elementwise(
        "{ .reg .b32 p, q, a, b, c, d, m; .reg .b16 l0, h0, l1, h1, l2, h2, l3, h3;"
        " shr.b32 p, $8, 4; shr.b32 q, $8, 8;"
        " lop3.b32 a, $8, 0x000F000F, 0x64006400, 0xEA; lop3.b32 b, p, 0x000F000F, 0x64006400, 0xEA;"
        " lop3.b32 c, q, 0x000F000F, 0x64006400, 0xEA; shr.b32 p, $8, 12;"
        " lop3.b32 d, p, 0x000F000F, 0x64006400, 0xEA;"
        " mov.b32 m, 0x64006400; sub.f16x2 a, a, m; sub.f16x2 b, b, m; sub.f16x2 c, c, m; sub.f16x2 d, d, m;"
        " mov.b32 {l0, h0}, a; mov.b32 {l1, h1}, b; mov.b32 {l2, h2}, c; mov.b32 {l3, h3}, d;"
        " cvt.f32.f16 $0, l0; cvt.f32.f16 $4, h0; cvt.f32.f16 $1, l1; cvt.f32.f16 $5, h1;"
        " cvt.f32.f16 $2, l2; cvt.f32.f16 $6, h2; cvt.f32.f16 $3, l3; cvt.f32.f16 $7, h3; }",
        "=r,=r,=r,=r,=r,=r,=r,=r,r", [w], dtype=(tl.float32,) * 8, is_pure=True, pack=1)  # fmt: skip


@triton.jit
def _tile_dot(w, s, z, xs, TG: tl.constexpr, FMA: tl.constexpr, PTX: tl.constexpr):
    """sum_k W[n, k] x[k] over one tile: nibble plane i of each packed row times x[8 r + i], summed per group,
    then the group's scale and zero applied once. PTX: the planes by `_nibbles_ptx` (the interpreter runs no
    PTX)."""
    if PTX:
        planes = _nibbles_ptx(w)
        t = planes[0] * xs[0][:, None]
        xsum = xs[0]
        for i in tl.static_range(1, 8):
            t += planes[i] * xs[i][:, None]
            xsum += xs[i]
    else:
        t = _nibble(w, 0) * xs[0][:, None]
        xsum = xs[0]
        for i in tl.static_range(1, 8):
            t += _nibble(w, i) * xs[i][:, None]
            xsum += xs[i]
    tg = tl.sum(tl.reshape(t, [TG, w.shape[0] // TG, w.shape[1]]), 1)
    xg = tl.sum(tl.reshape(xsum, [TG, w.shape[0] // TG]), 1)[:, None]
    if FMA:
        return tl.sum(tg * s + z * xg, 0)
    else:
        return tl.sum((tg - z * xg) * s, 0)


@triton.jit
def _gemv_int4_kernel(X, G, W, S, Z, BIAS, R, Y, N, stride_w, stride_s, stride_z, eps, COS, SIN, POS, SLOT,
                      KC, VC, stride_c_slot, K: tl.constexpr, GROUP: tl.constexpr, FMA: tl.constexpr,
                      PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TG: tl.constexpr, PAIR_GAP: tl.constexpr,
                      H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr,
                      PTX: tl.constexpr, EARLY_RES: tl.constexpr, PF0=0, PF0_END=0, PF1=0, PF1_END=0,
                      PF_CHUNK=0, PF_RANGES: tl.constexpr = 0):  # fmt: skip
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    offs_n, j0, head = _rows(pid, BLOCK_N, EPILOGUE, PAIR_GAP, D)
    nmask = offs_n < N
    r = tl.arange(0, BLOCK_K // 8)
    w, s, z = _load_tile(W, S, Z, 0, offs_n, nmask, stride_w, stride_s, stride_z, K, GROUP, BLOCK_K, TG)
    if PF_RANGES > 0:  # `gemv.gemv`'s `prefetch`
        fused.l2_prefetch(PF0, PF0_END, PF_CHUNK, pid)
    if PF_RANGES > 1:
        fused.l2_prefetch(PF1, PF1_END, PF_CHUNK, pid)
    # Before the wait: everything no kernel of this step writes (as `gemv._gemv_kernel`).
    if PROLOGUE == 1:
        g = _row_tile(G, r, K // 8)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        j, slot, c1, c2, s1, s2 = _rope_prefetch(pid, POS, SLOT, COS, SIN, BLOCK_N, D)
    if EPILOGUE == 1 and EARLY_RES:  # `gemv.RESIDUAL_BEFORE_WAIT` says why this may come before the wait
        res = tl.load(R + offs_n, mask=nmask, other=0.0).to(tl.float32)
    _wait_for_inputs(PDL)  # everything below may read the previous kernel's output
    act_ty = X.dtype.element_ty
    if PROLOGUE == 1:  # RMSNorm over the whole row (the wrapper makes BLOCK_K >= K), transformers' rounding
        xf = _row_tile(X, r, K // 8)
        inv = tl.rsqrt(tl.sum(tl.sum(xf * xf, 1), 0) / K + eps)
        xin = ((xf * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)
        acc = _tile_dot(w, s, z, _columns(xin), TG, FMA, PTX)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for t in tl.static_range(0, (K + BLOCK_K - 1) // BLOCK_K):
            acc += _tile_dot(w, s, z, _columns(_row_tile(X, t * (BLOCK_K // 8) + r, K // 8)), TG, FMA, PTX)
            w, s, z = _load_tile(W, S, Z, t + 1, offs_n, nmask, stride_w, stride_s, stride_z, K, GROUP,
                                 BLOCK_K, TG)  # fmt: skip
    if HAS_BIAS:
        acc = acc + bias
    if EPILOGUE == 2:
        _rope_cache_store(acc.to(act_ty).to(tl.float32), head, j, c1, c2, s1, s2, slot, Y, KC, VC,
                          stride_c_slot, HALF, H, KV, D)  # fmt: skip
    elif EPILOGUE == 1 and EARLY_RES:
        _store_residual(acc, res, Y, offs_n, nmask, act_ty)
    else:
        _store(acc, X, R, Y, offs_n, nmask, j0, N, EPILOGUE, HALF)


PTX_NIBBLES = {"on": True}  # `_nibbles_ptx` on the GPU (the interpreter runs no PTX)

# Keyed by (N, K); empty until measured inside the decode step (tiles faster alone were not, `gemv.TUNED`).
TUNED: dict[tuple[int, int], TileConfig] = {}


def default_tiles(n: int, k: int) -> TileConfig:
    """8 output rows (one 32-byte sector of each packed row) by up to 2048 weights: 8 KB a tile, as many
    programs as `gemv` runs for bf16 at K = 2048. Other BLOCK_N compile worse for sm_90 (Triton 3.6, read
    offline, not timed): x's [rows, 8] tile and the weight tile then get different layouts and every nibble
    plane goes through shared memory; 4096 weights a tile takes ~160 registers a thread instead of ~95.
    Measured on the H100 (F9 of 2026-11-23, batch-1 graph, same run): 8 columns 742-758 us, 16 columns 997,
    32 columns 1,780. 8 warps, not 4 (L4, twice in turn: 706 / 703 us against 737 / 741): 61-64 registers a
    thread instead of 96-126 (read offline), so twice the warps an SM and half the work a thread; int4's
    GEMVs are latency-bound (Nsight L2: 14-43% of DRAM peak at 12-24% achieved occupancy)."""
    return TileConfig(8, min(triton.next_power_of_2(k), 2048), WARPS["warps"])


# Warps a program (`default_tiles`); 16 is timed against 8 by `bench_decode.py --sections int4warpsab`.
WARPS = {"warps": 8}


def gemv_int4(
    x: torch.Tensor,
    weight: Int4Weight,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope_cache: RopeCache | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    tiles: TileConfig | None = None,
    prefetch: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """`gemv.gemv` (same arguments, results and errors) for an int4 weight; `tiles.block_k` counts weights
    (unpacked) and must be a power of two of at least 8."""
    n, k = weight.shape
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got {x.shape[0]}")
    cfg = tiles or TUNED.get((n, k)) or default_tiles(n, k)
    if norm_weight is not None and cfg.block_k < k:
        cfg = TileConfig(cfg.block_n, triton.next_power_of_2(k), cfg.num_warps)
    if cfg.block_k < 8 or cfg.block_k & (cfg.block_k - 1):
        raise ValueError(f"block_k must be a power of two >= 8, got {cfg.block_k}")
    out = _outputs(x, n, cfg, residual is not None, rope_cache, silu_pair, out_dtype)
    y, epilogue, gap, cfg, cache_args, (heads, kv_heads, d) = out
    grid = triton.cdiv(n // 2, cfg.block_n // 2) if silu_pair else triton.cdiv(n, cfg.block_n)
    w = weight
    pf = _prefetch_args(prefetch, grid, x)
    _gemv_int4_kernel[(grid,)](
        x, norm_weight if norm_weight is not None else x, w.packed, w.scales, w.zeros,
        bias if bias is not None else x, residual if residual is not None else x, y, n, w.packed.stride(0),
        w.scales.stride(0), w.zeros.stride(0), eps, *cache_args, K=k, GROUP=w.group, FMA=w.fma,
        PROLOGUE=PLAIN if norm_weight is None else NORM, EPILOGUE=epilogue, HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, TG=max(cfg.block_k // w.group, 1), PAIR_GAP=gap, H=heads,
        KV=kv_heads, D=d, PDL=fused.pdl_on(), PTX=PTX_NIBBLES["on"] and x.is_cuda,
        EARLY_RES=RESIDUAL_BEFORE_WAIT["on"] and fused.pdl_on() != 2, **pf, num_warps=cfg.num_warps,
        **fused.launch_options(),
    )  # fmt: skip
    return y


def _outputs(
    x: torch.Tensor,
    n: int,
    cfg: TileConfig,
    residual: bool,
    rc: RopeCache | None,
    silu_pair: bool,
    out_dtype: torch.dtype | None,
) -> tuple[torch.Tensor, int, int, TileConfig, tuple, tuple[int, int, int]]:
    """Output, epilogue, pair gap, tiles, cache arguments and (heads, kv heads, D), by `gemv.gemv`'s rules."""
    if rc is not None:
        d, heads, kv_heads = rc.k_cache.shape[-1], rc.heads, rc.kv_heads
        if n != (heads + 2 * kv_heads) * d:
            raise ValueError(
                f"rope_cache needs N = (heads + 2 kv_heads) * D = {(heads + 2 * kv_heads) * d}, got {n}"
            )
        y = torch.empty(1, heads, d, dtype=x.dtype, device=x.device)
        kc, vc = rc.k_cache.view(-1, kv_heads, d), rc.v_cache.view(-1, kv_heads, d)
        cfg = TileConfig(min(cfg.block_n, d), cfg.block_k, cfg.num_warps)  # inside one head
        cache_args = (rc.cos, rc.sin, rc.positions, rc.slots, kc, vc, kc.stride(0))
        return y, ROPE_CACHE, d // 2, cfg, cache_args, (heads, kv_heads, d)
    none = (x, x, x, x, x, x, 0)
    if silu_pair:
        if n % 2:
            raise ValueError(f"silu_pair needs gate and up rows of equal count, got N = {n}")
        cfg = TileConfig(max(2, cfg.block_n), cfg.block_k, cfg.num_warps)
        y = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
        return y, SILU_PAIR, n // 2, cfg, none, (1, 1, 1)
    y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    return y, RESIDUAL if residual else STORE, 1, cfg, none, (1, 1, 1)
