"""Decode-batch GEMMs (2 to 64 rows) in Triton, with the layer's small work fused in and programmatic
dependent launch: `gemv`'s ideas carried from one activation row to a skinny batch.

At batch 64 a 1.2B decode layer is four cuBLAS products and four small kernels (two `add_rmsnorm`,
`rope_write_cache`, `silu_mul`) at ~66 us against a 40.5 us weight-bandwidth floor (H100): each boundary is
a gap in which no weight is read, and cuBLAS cannot start early under PDL. Here:

- RMSNorm runs in the prologue (a first pass over this program's x rows for the sum of squares, then the
  x tiles normalised on the fly in the K loop), the residual add and SiLU(gate) x up in the epilogue (a
  program owns matching gate and up rows, `gemv._rows`), each rounded as the unfused model rounds;
- a program's first weight tile is loaded *before* `griddepcontrol.wait` (`gemv._wait_for_inputs`): the
  weights never depend on the previous kernel, the activations do;
- the next tile's loads stay in flight during the current tile's `tl.dot`, either by explicit prefetch
  (gemv's way) or by Triton's software pipeliner (`tl.range(num_stages=)`), a constexpr so both can be
  timed on the GPU;
- `swap_ab` computes W x^T (the weight rows fill the MMA's wide M side, the few activation rows its narrow
  N side, as skinny-GEMM libraries do); `split_k` splits K over programs for shapes with few N tiles (fp32
  partials, then a reduction kernel that runs the epilogue).

Float weights only (bf16, fp16, fp32); fp32 products use IEEE fp32, not TF32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.errors import InferforgeError
from inferforge.llm import fused
from inferforge.llm.gemv import TileConfig, _rows, _wait_for_inputs

PLAIN, NORM = 0, 1  # prologues (as gemv)
STORE, RESIDUAL, SILU_PAIR = 0, 1, 3  # epilogues (gemv's numbers, `_rows` reads them)
MIN_ROWS, MAX_ROWS = 2, 64
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


class GemmSmallError(InferforgeError, ValueError):
    """An argument `gemm_small` cannot run (shape, dtype, device, tile configuration); names it."""


@dataclass(frozen=True)
class GemmTiles:
    """One launch configuration of `gemm_small`."""

    block_n: int = 32  # output rows of W per program (pairs of gate/up halves for silu_pair); >= 16
    block_k: int = 128  # K columns per tile; >= 16
    num_warps: int = 4
    num_stages: int = 3  # the pipeliner's depth when `prefetch` is False
    prefetch: bool = True  # True: explicit next-tile loads (gemv); False: `tl.range(num_stages=)`
    swap_ab: bool = False  # accumulate [block_n, rows] = W x^T instead of [rows, block_n]
    split_k: int = 1  # K split over this many programs (fp32 partials + a reduction kernel)

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise GemmSmallError(f"GemmTiles.{name} must be a power of two >= 16 (tl.dot), got {v}")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise GemmSmallError(f"GemmTiles.num_warps must be 1, 2, 4, 8 or 16, got {self.num_warps}")
        if not 1 <= self.num_stages <= 8:
            raise GemmSmallError(f"GemmTiles.num_stages must be 1 to 8, got {self.num_stages}")
        if self.split_k < 1:
            raise GemmSmallError(f"GemmTiles.split_k must be >= 1, got {self.split_k}")


# Keyed by (N, K); empty until the lead's H100 run (bench_gemm_small.py) says which configurations win.
TUNED: dict[tuple[int, int], GemmTiles] = {}


def default_tiles(n: int, k: int, elem_bytes: int) -> GemmTiles:
    """32 KB-ish of weights per tile (64 x 128 bf16, 64 x 64 fp32); 64 rows a program only where that
    still gives a wave of programs on a 132-SM H100 (gate/up 16384: 256), else 32 (qkv 96 programs, o and
    down 64; every program re-reads all of x from L2, so narrower tiles trade x traffic for occupancy)."""
    block_n = 64 if n // 64 >= 132 else 32
    return GemmTiles(block_n=block_n, block_k=128 if elem_bytes <= 2 else 64)


def tiles_for(n: int, k: int, elem_bytes: int) -> GemmTiles:
    return TUNED.get((n, k)) or default_tiles(n, k, elem_bytes)


@triton.jit
def _valid_rows(offs_n, j0, N, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr):
    """Rows this program computes: for SiLU pairs, only pairs j < N/2 (a ragged last tile's gate half
    would otherwise reach into the up rows, which another program owns)."""
    if EPILOGUE == 3:
        return (j0 + tl.arange(0, BLOCK_N) % (BLOCK_N // 2)) < N // 2
    return offs_n < N


@triton.jit
def _x_tile(X, offs_m, mmask, kk, kmask, stride_xm):
    return tl.load(
        X + offs_m[:, None] * stride_xm + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0
    )


@triton.jit
def _normed(x, G, kk, kmask, inv, PROLOGUE: tl.constexpr, INTERP: tl.constexpr):
    """transformers' LlamaRMSNorm on a tile: fp32 normalise, round to x's dtype, times the weight, round."""
    if PROLOGUE == 1:
        g = tl.load(G + kk, mask=kmask, other=0.0).to(tl.float32)
        act_ty: tl.constexpr = x.dtype
        x = _to(
            _to(x.to(tl.float32) * inv[:, None], act_ty, INTERP).to(tl.float32) * g[None, :], act_ty, INTERP
        )
    return x


@triton.jit
def _to(v, ty: tl.constexpr, INTERP: tl.constexpr):
    """v.to(ty), rounded to nearest even as the GPU rounds. INTERP (the CPU interpreter, Triton 3.6, whose
    fp32 -> bf16 cast truncates): round the fp32 bits to the nearest even bf16 first, then truncate."""
    if INTERP and ty == tl.bfloat16 and v.dtype == tl.float32:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16) << 16
        v = u.to(tl.float32, bitcast=True)
    return v.to(ty)


@triton.jit
def _mma(x, w, acc, SWAP: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr):
    """The tile product in fp32. INTERP (the CPU interpreter only: its `tl.dot` multiplies bf16 bit
    patterns as integers, Triton 3.6) widens both tiles first: the same products, exact in fp32."""
    if w.dtype != x.dtype:  # an fp32 weight under bf16 rows: read as the model's `w.to(x.dtype)`
        w = _to(w.to(tl.float32), x.dtype, INTERP)
    if INTERP:
        x = x.to(tl.float32)
        w = w.to(tl.float32)
    if SWAP:
        if IEEE:  # noqa: SIM108 (Triton: a constexpr branch)
            acc = tl.dot(w, tl.trans(x), acc, input_precision="ieee")
        else:
            acc = tl.dot(w, tl.trans(x), acc)
    else:
        if IEEE:  # noqa: SIM108 (Triton: a constexpr branch)
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    return acc


@triton.jit
def _epilogue(acc, X, R, Y, offs_m, mmask, offs_n, nmask, j0, N, stride_rm, stride_ym, EPILOGUE: tl.constexpr,
              BLOCK_M: tl.constexpr, HALF: tl.constexpr, INTERP: tl.constexpr):  # fmt: skip
    """acc [BLOCK_M, BLOCK_N] fp32; the product is rounded to x's dtype before the add / activation."""
    act_ty: tl.constexpr = X.dtype.element_ty
    out_ty: tl.constexpr = Y.dtype.element_ty
    mask = mmask[:, None] & nmask[None, :]
    if EPILOGUE == 1:
        res = tl.load(R + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
        y = _to(acc, act_ty, INTERP).to(tl.float32) + res
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], _to(y, out_ty, INTERP), mask=mask)
    elif EPILOGUE == 3:
        a = tl.reshape(_to(acc, act_ty, INTERP).to(tl.float32), [BLOCK_M, 2, HALF])
        gate, up = tl.split(tl.permute(a, (0, 2, 1)))
        act = _to(gate / (1.0 + tl.exp(-gate)), act_ty, INTERP).to(tl.float32)
        out = j0 + tl.arange(0, HALF)
        omask = mmask[:, None] & (out < N // 2)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + out[None, :], _to(act * up, out_ty, INTERP), mask=omask)
    else:
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], _to(acc, out_ty, INTERP), mask=mask)


@triton.jit
def _gemm_small_kernel(X, G, W, R, Y, P, M, N, stride_xm, stride_wn, stride_rm, stride_ym, eps,
                       K: tl.constexpr, PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PAIR_GAP: tl.constexpr,
                       TILES_PER_SPLIT: tl.constexpr, SPLIT: tl.constexpr, PREFETCH: tl.constexpr,
                       NUM_STAGES: tl.constexpr, SWAP: tl.constexpr, IEEE: tl.constexpr, INTERP: tl.constexpr,
                       PDL: tl.constexpr):  # fmt: skip
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    NT: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    offs_n, j0, _ = _rows(pid, BLOCK_N, EPILOGUE, PAIR_GAP, 1)
    nmask = _valid_rows(offs_n, j0, N, BLOCK_N, EPILOGUE)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    t0 = tl.program_id(1) * TILES_PER_SPLIT
    t1 = tl.minimum(t0 + TILES_PER_SPLIT, NT)
    k_end = tl.minimum(t1 * BLOCK_K, K)  # this program's K columns end here (split-K)
    rows = W + offs_n[:, None].to(tl.int64) * stride_wn
    kk = t0 * BLOCK_K + offs_k
    w = tl.load(rows + kk[None, :], mask=nmask[:, None] & (kk < k_end)[None, :], other=0.0)
    _wait_for_inputs(PDL)  # before: weights only; below, x (and R) may be the previous kernel's output
    inv = tl.zeros([BLOCK_M], tl.float32)
    if PROLOGUE == 1:  # the sum of squares needs the whole row, whatever this program's K range
        ss = tl.zeros([BLOCK_M], tl.float32)
        for t in tl.range(0, NT):
            kr = t * BLOCK_K + offs_k
            xf = _x_tile(X, offs_m, mmask, kr, kr < K, stride_xm).to(tl.float32)
            ss += tl.sum(xf * xf, 1)
        inv = tl.rsqrt(ss / K + eps)
    if SWAP:  # noqa: SIM108 (Triton: a constexpr branch)
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PREFETCH:  # the next tile's w and x loads issued before this tile's product
        x = _x_tile(X, offs_m, mmask, kk, kk < k_end, stride_xm)
        for t in tl.range(t0, t1, num_stages=1):
            kt = t * BLOCK_K + offs_k
            nk = kt + BLOCK_K
            w_next = tl.load(rows + nk[None, :], mask=nmask[:, None] & (nk < k_end)[None, :], other=0.0)
            x_next = _x_tile(X, offs_m, mmask, nk, nk < k_end, stride_xm)
            acc = _mma(_normed(x, G, kt, kt < K, inv, PROLOGUE, INTERP), w, acc, SWAP, IEEE, INTERP)
            w = w_next
            x = x_next
    else:  # the first tile (loaded before the wait) peeled, the rest pipelined by the compiler
        x = _normed(
            _x_tile(X, offs_m, mmask, kk, kk < k_end, stride_xm), G, kk, kk < K, inv, PROLOGUE, INTERP
        )
        acc = _mma(x, w, acc, SWAP, IEEE, INTERP)
        for t in tl.range(t0 + 1, t1, num_stages=NUM_STAGES):
            kt = t * BLOCK_K + offs_k
            kmask = kt < k_end
            w = tl.load(rows + kt[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
            x = _normed(_x_tile(X, offs_m, mmask, kt, kmask, stride_xm), G, kt, kmask, inv, PROLOGUE, INTERP)
            acc = _mma(x, w, acc, SWAP, IEEE, INTERP)
    if SWAP:
        acc = tl.trans(acc)
    if SPLIT:  # fp32 partial [split, M, N] in W's row order; `_reduce_kernel` runs the epilogue
        part = P + tl.program_id(1) * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(part, acc, mask=mmask[:, None] & nmask[None, :])
    else:
        _epilogue(acc, X, R, Y, offs_m, mmask, offs_n, nmask, j0, N, stride_rm, stride_ym, EPILOGUE, BLOCK_M,
                  HALF, INTERP)  # fmt: skip


@triton.jit
def _reduce_kernel(X, R, Y, P, M, N, stride_rm, stride_ym, SPLITS: tl.constexpr, EPILOGUE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAIR_GAP: tl.constexpr,
                   INTERP: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """Sums split-K partials (in split order, deterministic) and runs the epilogue."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    offs_n, j0, _ = _rows(tl.program_id(0), BLOCK_N, EPILOGUE, PAIR_GAP, 1)
    nmask = _valid_rows(offs_n, j0, N, BLOCK_N, EPILOGUE)
    offs_m = tl.arange(0, BLOCK_M)
    mmask = offs_m < M
    _wait_for_inputs(PDL)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for s in tl.range(0, SPLITS):
        part = P + s * M * N + offs_m[:, None] * N + offs_n[None, :]
        acc += tl.load(part, mask=mmask[:, None] & nmask[None, :], other=0.0)
    _epilogue(acc, X, R, Y, offs_m, mmask, offs_n, nmask, j0, N, stride_rm, stride_ym, EPILOGUE, BLOCK_M,
              BLOCK_N // 2, INTERP)  # fmt: skip


def _check(x: torch.Tensor, weight: torch.Tensor, norm_weight: torch.Tensor | None,
           residual: torch.Tensor | None, silu_pair: bool) -> None:  # fmt: skip
    """Errors a caller can make, each naming the argument."""
    if x.dim() != 2 or not MIN_ROWS <= x.shape[0] <= MAX_ROWS:
        raise GemmSmallError(
            f"x must be [M, K] with {MIN_ROWS} <= M <= {MAX_ROWS}, got shape {tuple(x.shape)}; "
            "use gemv for one row and F.linear for larger batches"
        )
    if weight.dim() != 2 or weight.shape[1] != x.shape[1]:
        raise GemmSmallError(
            f"weight must be [N, K] with K = {x.shape[1]} (x's width), got {tuple(weight.shape)}"
        )
    if weight.dtype not in _FLOATS or x.dtype not in _FLOATS:
        raise GemmSmallError(f"x and weight must be bf16, fp16 or fp32, got {x.dtype} and {weight.dtype}")
    if norm_weight is not None and tuple(norm_weight.shape) != (x.shape[1],):
        raise GemmSmallError(f"norm_weight must be [K] = [{x.shape[1]}], got {tuple(norm_weight.shape)}")
    n = weight.shape[0]
    if silu_pair and (n % 2 or residual is not None):
        raise GemmSmallError(
            f"silu_pair needs an even N (gate rows then up rows) and no residual, got N = {n}"
        )
    if residual is not None and (tuple(residual.shape) != (x.shape[0], n) or residual.dtype != x.dtype):
        raise GemmSmallError(
            f"residual must be [M, N] = [{x.shape[0]}, {n}] of {x.dtype}, got {tuple(residual.shape)} "
            f"of {residual.dtype}"
        )
    for name, t in (("weight", weight), ("norm_weight", norm_weight), ("residual", residual)):
        if t is not None and t.device != x.device:
            raise GemmSmallError(f"{name} is on {t.device}, x on {x.device}: move them to one device")


def gemm_small(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    tiles: GemmTiles | TileConfig | None = None,
) -> torch.Tensor:
    """y = rmsnorm(x) @ weight.T then one epilogue, for a decode batch x [M, K], 2 <= M <= 64.

    `norm_weight`: RMSNorm each row of x first. `residual` [M, N]: returns round(y) + residual. `silu_pair`
    (gate rows then up rows): returns SiLU(gate) x up [M, N/2]. Otherwise y [M, N] in `out_dtype` (x's
    dtype by default; fp32 keeps the accumulator unrounded, as for logits).
    """
    _check(x, weight, norm_weight, residual, silu_pair)
    m, k = x.shape
    n = weight.shape[0]
    x, weight = (t if t.stride(1) == 1 else t.contiguous() for t in (x, weight))  # rows may be strided
    if residual is not None and residual.stride(1) != 1:
        residual = residual.contiguous()
    if norm_weight is not None:
        norm_weight = norm_weight.contiguous()
    cfg = tiles or tiles_for(n, k, weight.element_size())
    if isinstance(cfg, TileConfig):  # gemv's table entries: keep their sizes, raised to tl.dot's minimum
        cfg = GemmTiles(max(16, cfg.block_n), max(16, cfg.block_k), cfg.num_warps)
    epilogue = SILU_PAIR if silu_pair else RESIDUAL if residual is not None else STORE
    gap = n // 2 if silu_pair else 1
    y_dtype = x.dtype if residual is not None or silu_pair else (out_dtype or x.dtype)
    y = torch.empty(m, n // 2 if silu_pair else n, dtype=y_dtype, device=x.device)
    grid_n = triton.cdiv(n // 2, cfg.block_n // 2) if silu_pair else triton.cdiv(n, cfg.block_n)
    n_tiles = triton.cdiv(k, cfg.block_k)
    per_split = triton.cdiv(n_tiles, min(cfg.split_k, n_tiles))
    splits = triton.cdiv(n_tiles, per_split)
    block_m = max(16, triton.next_power_of_2(m))
    r = residual if residual is not None else x
    part = torch.empty(splits, m, n, dtype=torch.float32, device=x.device) if splits > 1 else y
    pdl = fused.pdl_on()
    interp = not x.is_cuda  # Triton's CPU interpreter (`_to`, `_mma`)
    _gemm_small_kernel[(grid_n, splits)](
        x, norm_weight if norm_weight is not None else x, weight, r, y, part, m, n, x.stride(0),
        weight.stride(0), r.stride(0), y.stride(0), eps, K=k, PROLOGUE=PLAIN if norm_weight is None else NORM,
        EPILOGUE=epilogue, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, PAIR_GAP=gap,
        TILES_PER_SPLIT=per_split, SPLIT=splits > 1, PREFETCH=cfg.prefetch, NUM_STAGES=cfg.num_stages,
        SWAP=cfg.swap_ab, IEEE=x.dtype == torch.float32 or interp, INTERP=interp, PDL=pdl,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **fused.launch_options(),
    )  # fmt: skip
    if splits > 1:
        _reduce_kernel[(grid_n,)](
            x, r, y, part, m, n, r.stride(0), y.stride(0), SPLITS=splits, EPILOGUE=epilogue, BLOCK_M=block_m,
            BLOCK_N=cfg.block_n, PAIR_GAP=gap, INTERP=interp, PDL=pdl, num_warps=4, **fused.launch_options(),
        )  # fmt: skip
    return y
