"""Batch-64 decode products (bf16, [64, K] x [N, K]^T) on cuBLAS against a split-K Triton GEMM (O-series).

Why: in the batch-64 decode step (run O2's timeline) cuBLAS reads o's weights at ~1.1 TB/s and q/k/v's and
down's at ~2 TB/s, where gate/up reaches 2.5. A skinny GEMM with its K split over programs (the last of a
column tile's programs sums the partials in a fixed order, so results do not depend on arrival) puts ~128
programs on the GPU for o's 32 column tiles. Each shape: 16 copies with their own weights (more than L2
holds) in one CUDA graph, us a call, median of 30 replays; correctness against torch.mm in fp32 sums.

    python benchmarks/llm/bench_skinny_gemm.py            # writes skinny_gemm.json under $OUT
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).parent))
from common import replay_us, write_json

SHAPES = {"o": (2048, 2048), "qkv": (3072, 2048), "down": (2048, 8192)}
COPIES = 16


@triton.jit
def _splitk_mm_kernel(X, W, Y, P, CNT, M, N, K, stride_xm, stride_wn, stride_ym, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr,
                      STAGES: tl.constexpr, PRE: tl.constexpr):  # fmt: skip
    # PRE > 0: programmatic dependent launch; the program's first PRE weight tiles are loaded before the
    # wait (weights are written by no kernel of the chain), the activations after it.
    if PRE > 0:
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_per = K // SPLIT
    k_lo = pid_k * k_per
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    mmask = offs_m[:, None] < M
    if PRE > 0:
        w0 = tl.load(W + offs_n[:, None] * stride_wn + (k_lo + offs_k)[None, :])
        if PRE > 1:
            w1 = tl.load(W + offs_n[:, None] * stride_wn + (k_lo + BLOCK_K + offs_k)[None, :])
        tl.extra.cuda.gdc_wait()
        x = tl.load(X + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :], mask=mmask, other=0.0)
        acc = tl.dot(x, tl.trans(w0), acc)
        if PRE > 1:
            x = tl.load(X + offs_m[:, None] * stride_xm + (k_lo + BLOCK_K + offs_k)[None, :], mask=mmask,
                        other=0.0)  # fmt: skip
            acc = tl.dot(x, tl.trans(w1), acc)
    for k0 in tl.range(k_lo + PRE * BLOCK_K, k_lo + k_per, BLOCK_K, num_stages=STAGES):
        x = tl.load(X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=mmask, other=0.0)
        w = tl.load(W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :])
        acc = tl.dot(x, tl.trans(w), acc)
    y_ptrs = Y + offs_m[:, None] * stride_ym + offs_n[None, :]
    if SPLIT == 1:
        tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mmask)
    else:
        tile = (offs_m[:, None] * N + offs_n[None, :]).to(tl.int64)
        tl.store(P + pid_k * M * N + tile, acc, mask=mmask)
        tl.debug_barrier()
        done = tl.atomic_add(CNT + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:
            total = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for s in range(SPLIT):  # fixed order: the same sums whoever arrives last
                total += tl.load(P + s * M * N + tile, mask=mmask, other=0.0, cache_modifier=".cg")
            tl.store(y_ptrs, total.to(Y.dtype.element_ty), mask=mmask)
            tl.store(CNT + pid_n, 0)


def splitk_mm(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, p: torch.Tensor, cnt: torch.Tensor,
              cfg: tuple[int, int, int, int, int, int]) -> None:  # fmt: skip
    bn, bk, split, stages, warps, pre = cfg
    m, k = x.shape
    n = w.shape[0]
    _splitk_mm_kernel[(n // bn, split)](
        x, w, y, p, cnt, m, n, k, x.stride(0), w.stride(0), y.stride(0), BLOCK_M=64, BLOCK_N=bn, BLOCK_K=bk,
        SPLIT=split, STAGES=stages, PRE=pre, num_warps=warps, **({"launch_pdl": True} if pre else {}),
    )  # fmt: skip


def graph_us(fn) -> float:  # type: ignore[no-untyped-def]
    """Median us a call over 30 replays of a graph of COPIES calls."""
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return replay_us(g, COPIES)


def configs(n: int, k: int) -> list[tuple[int, int, int, int, int, int]]:
    out = []
    grid = itertools.product((32, 64), (64, 128), (1, 2, 4, 8), (4,), (4,), (0, 1, 2))
    for bn, bk, split, stages, warps, pre in grid:
        if n % bn or k % (split * bk) or (n // bn) * split > 4 * 132 or k // split < pre * bk:
            continue
        out.append((bn, bk, split, stages, warps, pre))
    return out


def one_shape(name: str, n: int, k: int, gen: torch.Generator) -> dict:
    """cuBLASLt and every split-K configuration on one product shape; prints the best."""
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    x = torch.randn(64, k, device=dev, generator=gen, dtype=bf16)
    ws = [torch.randn(n, k, device=dev, generator=gen, dtype=bf16) * 0.02 for _ in range(COPIES)]
    ys = [torch.empty(64, n, device=dev, dtype=bf16) for _ in range(COPIES)]
    ref = (x.float() @ ws[0].float().t()).to(bf16).float()
    mb = n * k * 2 / 1e6

    def cublas() -> None:
        for w, y in zip(ws, ys, strict=True):
            torch.mm(x, w.t(), out=y)

    base = graph_us(cublas)
    row: dict = {"cublas_us": base, "cublas_tb_s": mb / base, "triton": {}}
    print(f"{name:8s} N={n} K={k} {mb:.1f} MB  cuBLASLt {base:6.2f} us ({mb / base:.2f} TB/s)", flush=True)
    best: dict = {}
    for cfg in configs(n, k):
        p = torch.empty(cfg[2] * 64 * n, device=dev, dtype=torch.float32)
        cnt = torch.zeros(n // cfg[0], device=dev, dtype=torch.int32)

        def tri(p: torch.Tensor = p, cnt: torch.Tensor = cnt, cfg: tuple = cfg) -> None:
            for w, y in zip(ws, ys, strict=True):
                splitk_mm(x, w, y, p, cnt, cfg)

        try:
            splitk_mm(x, ws[0], ys[0], p, cnt, cfg)
            err = (ys[0].float() - ref).abs().max().item()
            us = graph_us(tri)
        except Exception as exc:  # a configuration that does not compile is reported, not fatal
            print(f"   {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
            continue
        row["triton"][str(cfg)] = {"us": us, "max_err": err}
        if cfg[-1] not in best or us < best[cfg[-1]][1]:
            best[cfg[-1]] = (cfg, us, err)
    for pre, (cfg, us, err) in sorted(best.items()):
        speed = f"{us:6.2f} us ({mb / us:.2f} TB/s, {base / us:.2f}x cuBLASLt), max err {err:.3g}"
        print(f"   best, {pre} tiles before the PDL wait (bn, bk, split, stages, warps, pre) {cfg}: {speed}")
        row[f"best_pre{pre}"] = {"cfg": list(cfg), "us": us, "max_err": err, "speedup": base / us}
    return row


def main() -> None:
    torch.backends.cuda.preferred_blas_library("cublaslt")  # the engine's default (EngineConfig.gemm_library)
    gen = torch.Generator(device="cuda").manual_seed(0)
    results: dict = {"device": torch.cuda.get_device_name(), "copies": COPIES, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        results["shapes"][name] = one_shape(name, n, k, gen)
    write_json("skinny_gemm.json", results)


if __name__ == "__main__":
    main()
