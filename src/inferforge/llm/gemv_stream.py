"""Batch-1 decode GEMVs as a persistent, software-pipelined stream of weight tiles (experiment).

`gemv.py` gives each program one tile (about 32 KB) which it loads whole into registers, then converts and
reduces: while a program converts, it has no load in flight, and the programs of one wave load and convert in
step. 8-bit weights carry twice the elements per byte, so their conversion phase is twice as long and their
products run at ~2.2 TB/s where bf16 reaches ~2.9 (G8 of 2026-11-23). Here each program walks a strided list
of row tiles (`tl.range(..., num_stages=STAGES)`), so the compiler keeps STAGES - 1 tiles in flight (through
shared memory) while it reduces the current one. A tile is BLOCK_N whole rows (K is a power of two, <= 8192),
so the activation row is loaded and normalised once per program, not once per tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.llm import fused
from inferforge.llm.gemv import RESIDUAL, SILU_PAIR, STORE, _rows, _store, _wait_for_inputs, _weights_f32


@dataclass(frozen=True)
class StreamConfig:
    block_n: int  # rows per tile
    stages: int  # tiles in flight + 1
    programs: int  # grid size (a multiple of the SM count: programs per SM)
    num_warps: int = 4


# Products that take this kernel in the decode step, keyed by (N, K, weight bytes per element); empty until
# measured faster there than `gemv.gemv`.
TUNED: dict[tuple[int, int, int], StreamConfig] = {}


def config_for(n: int, k: int, elem_bytes: int) -> StreamConfig | None:
    cfg = TUNED.get((n, k, elem_bytes))
    return cfg if cfg is not None and k & (k - 1) == 0 and n % cfg.block_n == 0 else None


@triton.jit
def _stream_kernel(X, G, W, SCALE, R, Y, N, stride_wn, eps, K: tl.constexpr, NORM: tl.constexpr,
                   EPILOGUE: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
                   W_MODE: tl.constexpr, PAIR_GAP: tl.constexpr, STAGES: tl.constexpr,
                   PDL: tl.constexpr):  # fmt: skip
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    HALF: tl.constexpr = BLOCK_N // 2
    n_tiles = N // BLOCK_N
    offs_k = tl.arange(0, K)
    if NORM:
        g = tl.load(G + offs_k).to(tl.float32)
    _wait_for_inputs(PDL)
    act_ty = X.dtype.element_ty
    xf = tl.load(X + offs_k).to(tl.float32)
    if NORM:  # transformers' rounding, as `gemv`
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)
        xf = ((xf * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)
    for t in tl.range(pid, n_tiles, tl.num_programs(0), num_stages=STAGES):
        offs_n, j0, _ = _rows(t, BLOCK_N, EPILOGUE, PAIR_GAP, 1)
        w = tl.load(W + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :])
        acc = tl.sum(_weights_f32(w, W_MODE) * xf[None, :], 1)
        if HAS_SCALE:
            acc = acc * tl.load(SCALE + offs_n).to(tl.float32)
        _store(acc, X, R, Y, offs_n, offs_n < N, j0, N, EPILOGUE, HALF)


def stream_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    block_n: int = 8,
    stages: int = 4,
    programs: int = 132,
    num_warps: int = 4,
) -> torch.Tensor:
    """`gemv.gemv` without the RoPE epilogue: y = rmsnorm(x) @ weight.T (* scale), then the residual add or
    SiLU(gate) x up, for one row x [1, K]; K a power of two, N a multiple of `block_n`."""
    n, k = weight.shape
    if x.shape[0] != 1 or k & (k - 1) or n % block_n:
        raise ValueError(f"stream_gemv takes one row, K a power of two and N % block_n == 0; got {x.shape}, "
                         f"{weight.shape}, block_n {block_n}")  # fmt: skip
    epilogue, gap = (RESIDUAL if residual is not None else STORE), 1
    if silu_pair:
        epilogue, gap = SILU_PAIR, n // 2
        y = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    w_mode = 1 if weight.dtype == torch.uint8 else 3 if weight.dtype == torch.int8 else 0
    tiles = n // block_n
    _stream_kernel[(min(programs, tiles),)](
        x, norm_weight if norm_weight is not None else x, weight, scale if scale is not None else x,
        residual if residual is not None else x, y, n, weight.stride(0), eps, K=k,
        NORM=norm_weight is not None, EPILOGUE=epilogue, HAS_SCALE=scale is not None, BLOCK_N=block_n,
        W_MODE=w_mode, PAIR_GAP=gap, STAGES=stages, PDL=fused.pdl_on(), num_warps=num_warps,
        **fused.launch_options(),
    )  # fmt: skip
    return y
