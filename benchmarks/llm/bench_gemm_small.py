"""Decode-batch products of the 1.2B shape: cuBLAS plus the fused kernel each one replaces, against
`inferforge.llm.gemm_small` tile configurations (norm prologue, residual / SiLU-pair epilogues, PDL).

    python benchmarks/llm/bench_gemm_small.py [--quick]      # CUDA only; writes bench_gemm_small.json
    python benchmarks/llm/bench_gemm_small.py --check-only   # the reference checks alone (CPU: interpreter)

Method of bench_gemv.py: 16 distinct weight copies per shape (the 50 MB L2 cannot serve them), the 16 calls
captured in one CUDA graph, replayed between CUDA events; us per call and TB/s of the weight bytes.
a) per shape and batch (64, 16): the peer is what the model runs today (`fused.add_rmsnorm` then
   `F.linear` for q/k/v; `F.linear` then the residual add for o and down; `fused.add_rmsnorm`, `F.linear`,
   `fused.silu_mul` for gate/up), against `gemm_small` over a few tile configurations with PDL;
b) the layer chain without attention (norm + qkv -> o + residual -> norm + gate/up + SiLU -> down +
   residual), 16 layers of distinct weights in one graph: the peer's 7 kernels a layer against 4.
Before timing, each path's output is compared with the peer's (relative to its largest magnitude).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # --check-only on the CPU

sys.path.insert(0, str(Path(__file__).parent))
from common import free, write_json

from inferforge.llm import fused
from inferforge.llm.gemm_small import TUNED, GemmTiles, default_tiles, gemm_small

EPS = 1e-5
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "w13": (16384, 2048), "w2": (2048, 8192)}
ROLE = {"qkv": "norm", "o": "residual", "w13": "norm+silu", "w2": "residual"}
T = GemmTiles
CANDIDATES = {  # beyond the default: pipeliner depth, swap-AB (W on the MMA's wide side), narrower / wider
    # tiles, split-K (wide N tiles re-read x from L2 fewer times: (N / block_n) x M x K x 2 bytes a call)
    "qkv": [T(32, 128, prefetch=False), T(64, 128, swap_ab=True), T(64, 128, swap_ab=True, prefetch=False),
            T(16, 128), T(128, 128, num_warps=8, swap_ab=True, prefetch=False),
            T(64, 128, swap_ab=True, split_k=2)],
    "o": [T(32, 128, prefetch=False), T(32, 128, prefetch=False, num_stages=4), T(64, 128, swap_ab=True),
          T(16, 128), T(64, 128, swap_ab=True, split_k=4), T(128, 128, num_warps=8, swap_ab=True, split_k=8)],
    "w13": [T(64, 128, prefetch=False), T(64, 128, prefetch=False, num_stages=4), T(64, 128, swap_ab=True),
            T(128, 64, swap_ab=True, prefetch=False), T(32, 128), T(128, 128, num_warps=8, swap_ab=True)],
    "w2": [T(32, 128, prefetch=False), T(64, 128, swap_ab=True), T(64, 256, num_warps=8, swap_ab=True),
           T(64, 128, swap_ab=True, split_k=4), T(128, 128, num_warps=8, swap_ab=True, split_k=8),
           T(128, 128, num_warps=8, swap_ab=True, prefetch=False, split_k=8)],
}  # fmt: skip
ROWS: list[str] = []


def row(text: str) -> None:
    ROWS.append(text)
    print(text, flush=True)


def graph_us(calls: list[Callable[[], object]], reps: int = 20) -> float:
    """us per call: the calls captured in one graph, replayed `reps` times between events (bench_gemv)."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (reps * len(calls)))
    del graph
    return sorted(times)[2]


def _norm(x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    """The model's `add_rmsnorm` (its eager reference on the CPU, where the kernel would be interpreted)."""
    if x.is_cuda:
        return fused.add_rmsnorm(x, residual, w, EPS)[0]
    return fused.add_rmsnorm_reference(x, residual, w, EPS)[0]


def _silu_mul(h: torch.Tensor) -> torch.Tensor:
    if h.is_cuda:
        return fused.silu_mul(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def peer(name: str, x: torch.Tensor, w: torch.Tensor, nw: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """What the model runs today for this product, with the small kernel it needs beside it."""
    if name == "qkv":
        return F.linear(_norm(x, None, nw), w)
    if name == "w13":
        return _silu_mul(F.linear(_norm(x, None, nw), w))
    return F.linear(x, w) + r


def ours(name: str, x: torch.Tensor, w: torch.Tensor, nw: torch.Tensor, r: torch.Tensor,
         tiles: GemmTiles | None = None) -> torch.Tensor:  # fmt: skip
    if name == "qkv":
        return gemm_small(x, w, norm_weight=nw, eps=EPS, tiles=tiles)
    if name == "w13":
        return gemm_small(x, w, norm_weight=nw, eps=EPS, silu_pair=True, tiles=tiles)
    return gemm_small(x, w, residual=r, tiles=tiles)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()


def randn(gen: torch.Generator, dev: torch.device, *shape: int, scale: float = 1.0) -> torch.Tensor:
    """bf16 normal values drawn on the generator's device (the CPU takes seconds for a chain's 2 GB)."""
    return (torch.randn(*shape, generator=gen, device=gen.device) * scale).to(dev, torch.bfloat16)


def operands(n: int, k: int, m: int, dev: torch.device, copies: int, gen: torch.Generator) -> tuple:
    """Weights of std 0.02 as a trained model's; x of unit scale; the norm weight near 1."""
    ws = [randn(gen, dev, n, k, scale=0.02) for _ in range(copies)]
    return ws, randn(gen, dev, m, k), 1 + randn(gen, dev, k, scale=1 / 8), randn(gen, dev, m, n)


def check(dev: torch.device, shapes: dict[str, tuple[int, int]], ms: tuple[int, ...]) -> dict[str, float]:
    """gemm_small against the peer on each shape, batch and candidate tile configuration (bf16: a few
    rounding steps of 2^-8 at most; a wrong tile or mask is off by O(1))."""
    gen, out = torch.Generator(device=dev).manual_seed(0), {}
    for name, (n, k) in shapes.items():
        for m in ms:
            ws, x, nw, r = operands(n, k, m, dev, 1, gen)
            want = peer(name, x, ws[0], nw, r)
            for cfg in [None, *CANDIDATES.get(name, [])]:
                key = label(cfg).replace(" ", "_") if cfg else "default"
                out[f"{name}_m{m}_{key}"] = rel(ours(name, x, ws[0], nw, r, cfg), want)
    return out


def label(cfg: GemmTiles) -> str:
    mode = "pf" if cfg.prefetch else f"st{cfg.num_stages}"
    return f"{cfg.block_n:3d}x{cfg.block_k:3d} w{cfg.num_warps} {mode}{' swap' if cfg.swap_ab else ''}" + (
        f" split{cfg.split_k}" if cfg.split_k > 1 else ""
    )


def x_reads_mb(name: str, n: int, k: int, m: int, cfg: GemmTiles) -> float:
    """MB of x each call reads from L2 (every program reads x's rows over its K range; the norm's first
    pass reads whole rows in each split): arithmetic, not a measurement, beside the weights' n k 2."""
    grid_n, tiles = -(-n // cfg.block_n), -(-k // cfg.block_k)
    splits = -(-tiles // -(-tiles // min(cfg.split_k, tiles)))  # as `gemm_small` splits
    norm_pass = grid_n * splits if ROLE[name].startswith("norm") else 0
    return (grid_n + norm_pass) * m * k * 2 / 1e6


def bench_shape(name: str, n: int, k: int, m: int, quick: bool) -> dict:
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    ws, x, nw, r = operands(n, k, m, dev, 16, gen)
    mb = n * k * 2 / 1e6
    out: dict = {}
    head = f"{name:4s} {n:5d}x{k:4d} M={m:2d} {ROLE[name]:9s}"
    fused.enable_pdl(False)
    us = graph_us([lambda w=w: peer(name, x, w, nw, r) for w in ws])  # type: ignore[misc]
    out["cublas_fused_us"] = us
    row(f"{head} cuBLAS + fused kernel {'':27s} {us:7.1f} us  {mb / us:5.2f} TB/s  (W {mb:.1f} MB)")
    default = default_tiles(n, k, 2)
    best: tuple[float, GemmTiles] | None = None
    configs = [(default, False), *[(c, True) for c in [default, *CANDIDATES[name]][: 3 if quick else None]]]
    for cfg, pdl in configs:
        fused.enable_pdl(pdl)
        us = graph_us([lambda w=w, c=cfg: ours(name, x, w, nw, r, c) for w in ws])  # type: ignore[misc]
        key, xr = label(cfg).replace(" ", "_"), x_reads_mb(name, n, k, m, cfg)
        out[f"gemm_small_{key}_pdl{int(pdl)}_us"], out[f"x_reads_mb_{key}"] = us, xr
        text = f"{head} gemm_small {label(cfg):28s} pdl={int(pdl)} {us:7.1f} us  {mb / us:5.2f} TB/s"
        row(f"{text}  x {xr:5.1f} MB")
        if pdl and (best is None or us < best[0]):
            best = (us, cfg)
    assert best is not None
    out["best_pdl"] = {"us": best[0], "tiles": best[1].__dict__}
    fused.enable_pdl(False)
    del ws
    free()
    return out


def chains(layers: list[dict[str, torch.Tensor]], h0: torch.Tensor) -> tuple[Callable, Callable]:
    """The layer chain without attention: the peer's 7 kernels a layer, and gemm_small's 4."""
    hidden = h0.shape[1]

    def peer_chain() -> torch.Tensor:
        res, d = h0.clone(), torch.zeros_like(h0)
        for w in layers:
            qkv = F.linear(_norm(d, res, w["n1"]), w["qkv"])
            o = F.linear(qkv[:, :hidden], w["o"])
            d = F.linear(_silu_mul(F.linear(_norm(o, res, w["n2"]), w["w13"])), w["w2"])
        return d + res

    def our_chain() -> torch.Tensor:
        h = h0
        for w in layers:
            qkv = gemm_small(h, w["qkv"], norm_weight=w["n1"], eps=EPS)
            h = gemm_small(qkv[:, :hidden], w["o"], residual=h)
            a = gemm_small(h, w["w13"], norm_weight=w["n2"], eps=EPS, silu_pair=True)
            h = gemm_small(a, w["w2"], residual=h)
        return h

    return peer_chain, our_chain


def make_layers(
    shapes: dict[str, tuple[int, int]], count: int, m: int, dev: torch.device
) -> tuple[list, torch.Tensor]:
    gen = torch.Generator(device=dev).manual_seed(2)
    hidden = shapes["o"][0]
    layers = []
    for _ in range(count):
        w = {name: operands(n, k, 1, dev, 1, gen)[0][0] for name, (n, k) in shapes.items()}
        w["n1"], w["n2"] = (1 + randn(gen, dev, hidden, scale=1 / 8) for _ in "12")
        layers.append(w)
    return layers, randn(gen, dev, m, hidden)


def chain(m: int, tuned: dict[tuple[int, int], GemmTiles]) -> dict:
    """16 layers of distinct weights, one graph each path: the peer, then gemm_small with its default
    tiles and with the per-shape best of part a, PDL off and on."""
    layers, h0 = make_layers(SHAPES, 16, m, torch.device("cuda"))
    peer_chain, our_chain = chains(layers, h0)
    out: dict = {}
    fused.enable_pdl(False)
    want = peer_chain()
    out["cublas_fused_us_per_layer"] = us = graph_us([peer_chain]) / 16
    row(f"chain M={m:2d} cuBLAS + fused kernels (7 a layer)       {us:7.1f} us/layer  {121.5 / us:5.2f} TB/s")
    for tag, table in (("default", {}), ("best", tuned)):
        saved = dict(TUNED)
        TUNED.clear()
        TUNED.update(table)
        for pdl in (False, True):
            fused.enable_pdl(pdl)
            out[f"{tag}_error"] = rel(our_chain(), want)
            us = graph_us([our_chain]) / 16
            out[f"gemm_small_{tag}_pdl{int(pdl)}_us_per_layer"] = us
            row(f"chain M={m:2d} gemm_small {tag:7s} tiles pdl={int(pdl)} (4 a layer) {us:7.1f} us/layer  "
                f"{121.5 / us:5.2f} TB/s  (rel. diff to peer {out[f'{tag}_error']:.1e})")  # fmt: skip
        TUNED.clear()
        TUNED.update(saved)
    fused.enable_pdl(False)
    layers.clear()
    free()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three tile configs per shape")
    ap.add_argument("--check-only", action="store_true", help="the reference checks alone (CPU: interpreter)")
    args = ap.parse_args()
    if args.check_only and not torch.cuda.is_available():
        small = {"qkv": (96, 80), "o": (80, 80), "w13": (192, 80), "w2": (80, 96)}  # a consistent layer
        errors = check(torch.device("cpu"), small, (5, 64))
        peer_chain, our_chain = chains(*make_layers(small, 3, 7, torch.device("cpu")))
        errors["chain"] = rel(our_chain(), peer_chain())
        print(f"{len(errors)} checks, largest rel. difference {max(errors.values()):.2e}")
        sys.exit(0 if max(errors.values()) < 3e-2 else 1)
    if not torch.cuda.is_available():
        sys.exit(
            "bench_gemm_small.py times CUDA kernels and found no CUDA device (--check-only runs on the CPU)"
        )
    t0 = time.perf_counter()
    dev = torch.device("cuda")
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    fused.enable_pdl(True)  # the variants timed below (each configuration compiles once)
    results["check"] = errors = check(dev, SHAPES, (64, 16))
    fused.enable_pdl(False)
    worst = max(errors, key=lambda key: errors[key])
    row(f"gemm_small vs peer: {len(errors)} checks, largest rel. difference {errors[worst]:.2e} ({worst})"
        + ("  MISMATCH: timings below are of a wrong kernel" if errors[worst] > 3e-2 else ""))  # fmt: skip
    if args.check_only:
        write_json("bench_gemm_small.json", results)
        return
    for m in (64, 16):
        tuned = {}
        for name, (n, k) in SHAPES.items():
            results[f"{name}_m{m}"] = res = bench_shape(name, n, k, m, args.quick)
            tuned[(n, k)] = GemmTiles(**res["best_pdl"]["tiles"])
            write_json("bench_gemm_small.json", results)
        results[f"chain_m{m}"] = chain(m, tuned)
        write_json("bench_gemm_small.json", results)
    results["seconds"] = time.perf_counter() - t0
    write_json("bench_gemm_small.json", results)
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
