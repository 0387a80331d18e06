"""Batch-1 GEMVs of the 1.2B shape: cuBLAS (`F.linear`) against `inferforge.llm.gemv` tile configurations.

    python benchmarks/llm/bench_gemv.py [--quick]

Method of ../shared/measurements/decode-kernels.md: 16 distinct weight copies per shape (the 50 MB L2 cannot
serve them), the 16 calls captured in one CUDA graph, replayed between CUDA events; us per call and the
effective TB/s of the weight bytes. `gemv` runs without and with programmatic dependent launch (PDL: in a
chain of calls the next one's weight reads start while the previous one finishes, as in the decode graph).
Also int8 and fp8 weights (per-channel scale) through the same kernel. Prints a table; writes
bench_gemv.json under $OUT.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import free, graph_us, write_json

from inferforge.llm import fused, gemv, gemv_check

SHAPES = {
    "qkv": (3072, 2048), "o": (2048, 2048), "w13": (16384, 2048), "w2": (2048, 8192),
    "lm_head": (128256, 2048),
}  # fmt: skip
CANDIDATES = {
    2048: [(4, 2048, 4), (8, 2048, 4), (8, 2048, 8), (16, 2048, 8), (8, 1024, 4), (16, 1024, 4), (16, 512, 4),
           (32, 512, 4), (32, 256, 4)],
    8192: [(2, 4096, 4), (4, 2048, 4), (4, 4096, 8), (8, 1024, 4), (8, 2048, 8), (16, 512, 4), (16, 1024, 8),
           (32, 256, 4)],
}  # fmt: skip
Q_CANDIDATES = {
    2048: [(8, 2048, 4), (16, 2048, 4), (16, 2048, 8), (32, 1024, 4), (32, 2048, 8)],
    8192: [(4, 4096, 4), (8, 2048, 4), (8, 4096, 8), (16, 1024, 4), (16, 2048, 8)],
}  # fmt: skip
ROWS: list[str] = []


def row(text: str) -> None:
    ROWS.append(text)
    print(text, flush=True)


def quantize(w: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel int8 (uint8: stored + 128, `gemv._weights_f32` mode 1) or fp8 e4m3."""
    top = 448.0 if fmt == "fp8" else 127.0
    scale = (w.float().abs().amax(1) / top).clamp(min=1e-8)
    q = w.float() / scale[:, None]
    if fmt == "fp8":
        return q.to(torch.float8_e4m3fn), scale
    q = q.round().clamp(-127, 127)
    return (q + 128).to(torch.uint8) if fmt == "uint8" else q.to(torch.int8), scale


def bench_shape(name: str, n: int, k: int, copies: int, quick: bool) -> dict:
    dev = torch.device("cuda")
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    mb = n * k * 2 / 1e6
    out: dict = {}
    fused.enable_pdl(False)
    us = graph_us([lambda w=w: F.linear(x, w) for w in ws])
    out["cublas_us"] = us
    row(f"{name:8s} {n}x{k} cuBLAS F.linear            {us:7.1f} us  {mb / us:5.2f} TB/s")
    best = None
    for bn, bk, warps in CANDIDATES[k][: 3 if quick else None]:
        cfg = gemv.TileConfig(bn, bk, warps)
        for pdl in (False, True):
            fused.enable_pdl(pdl)
            us = graph_us([lambda w=w, c=cfg: gemv.gemv(x, w, tiles=c) for w in ws])
            out[f"gemv_{bn}x{bk}w{warps}_pdl{int(pdl)}_us"] = us
            label = f"{name:8s} {n}x{k} gemv {bn:3d}x{bk:4d} w{warps} pdl={int(pdl)}"
            row(f"{label}  {us:7.1f} us  {mb / us:5.2f} TB/s")
            if pdl and (best is None or us < best[0]):
                best = (us, cfg)
    assert best is not None
    out["best_pdl"] = {"us": best[0], "tiles": best[1].__dict__}
    del ws
    free()
    for fmt in ("int8", "int8-f16", "int8-bits", "uint8", "fp8"):
        qs = [quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16), fmt) for _ in range(copies)]
        gemv.INT8_MODE["mode"] = {"int8-f16": 2, "int8-bits": 3}.get(fmt, 0)
        qbest = None
        for bn, bk, warps in Q_CANDIDATES[k][: 2 if quick else None]:
            cfg = gemv.TileConfig(bn, bk, warps)
            fused.enable_pdl(True)
            us = graph_us([lambda q=q, s=s, c=cfg: gemv.gemv(x, q, scale=s, tiles=c) for q, s in qs])
            out[f"{fmt}_{bn}x{bk}w{warps}_pdl1_us"] = us
            label = f"{name:8s} {n}x{k} {fmt} gemv {bn:3d}x{bk:4d} w{warps} pdl=1"
            row(f"{label} {us:7.1f} us  {mb / 2 / us:5.2f} TB/s")
            if qbest is None or us < qbest[0]:
                qbest = (us, cfg)
        assert qbest is not None
        out[f"{fmt}_best_pdl"] = {"us": qbest[0], "tiles": qbest[1].__dict__}
        del qs
        free()
    gemv.INT8_MODE["mode"] = 0
    fused.enable_pdl(False)
    return out


def bench_attention() -> dict:
    """The paged decode kernel at batch 1 per keys-per-iteration tile and context, 16 layers' caches in one
    graph with PDL (as in the decode step)."""
    from inferforge.llm import triton_attn

    dev, dt, out = torch.device("cuda"), torch.bfloat16, {}
    caches = [tuple(torch.randn(129, 16, 8, 64, device=dev, dtype=dt) for _ in "kv") for _ in range(16)]
    q = torch.randn(1, 32, 64, device=dev, dtype=dt)
    bt = torch.randperm(128, device=dev)[:64].add(1).view(1, 64)
    fused.enable_pdl(True)
    for ctx in (272, 1024):
        lens = torch.tensor([ctx], device=dev)
        for tile in (32, 64, 128, 256):
            triton_attn.TILE["small_batch"] = tile
            us = graph_us([lambda k=k, v=v, n=lens: triton_attn.paged_decode_attention(q, k, v, bt, n, 0.125)
                           for k, v in caches])  # fmt: skip
            out[f"ctx{ctx}_tile{tile}_us"] = us
            row(f"paged decode attention batch 1, context {ctx:4d}, tile {tile:3d}   {us:7.1f} us")
    triton_attn.TILE["small_batch"] = 64
    fused.enable_pdl(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="three tile configs per shape")
    args = ap.parse_args()
    t0 = time.perf_counter()
    results: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    dev = torch.device("cuda")
    results["check_bf16"] = gemv_check.check_against_reference(dev, torch.bfloat16)
    results["check_fp32"] = gemv_check.check_against_reference(dev, torch.float32)
    row(f"gemv rel. error vs reference: bf16 {results['check_bf16']}, fp32 {results['check_fp32']}")
    results["attention"] = bench_attention()
    for name, (n, k) in SHAPES.items():
        copies = 4 if name == "lm_head" else 16  # 4 x 525 MB already exceeds the L2 tenfold
        results[name] = bench_shape(name, n, k, copies, args.quick)
        write_json("bench_gemv.json", results)
    results["seconds"] = time.perf_counter() - t0
    write_json("bench_gemv.json", results)
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
