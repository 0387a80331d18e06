"""Batch-1 int4 GEMVs of the 1.2B shape: the tensor-core CUDA kernel (`llm/cuda_int4.py`) against the Triton
int4 GEMV the engine runs today (`llm/gemv_int4.py`) and bf16 cuBLAS, on the same gemlite-packed weights.

    python benchmarks/llm/bench_int4_tc.py [--quick]

Method of ../shared/measurements/decode-kernels.md: distinct weight copies per shape (more bytes than the
50 MB L2), the calls captured in one CUDA graph with PDL, replayed between CUDA events; us per call and TB/s
of the stored int4 bytes (packed weights + scales + zeros). Then the GEMV chain of one decode step (16 x
q/k/v, o, gate/up, down, and the LM head; distinct weights) in one graph, per kernel. Accuracy: each
output against an fp32 product with the dequantized weights (max abs error / max abs reference).
Writes bench_int4_tc.json under $OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import free, graph_us, write_json

from inferforge.llm import cuda_int4, fused, gemv_int4, quant

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "w13": (16384, 2048), "w2": (2048, 8192),
          "lm_head": (128256, 2048)}  # fmt: skip
RESULTS: dict = {"micro": {}, "chain": {}, "accuracy": {}}


def make_layer(n: int, k: int, dtype: torch.dtype = torch.bfloat16):
    lin = nn.Linear(k, n, bias=False, device="cuda", dtype=dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    layer = quant.quantize_linear(lin, "int4")
    w = gemv_int4.int4_weight(layer)
    assert w is not None, "gemlite layer not in the layout gemv_int4 reads"
    return layer, w


def dequantized(w: gemv_int4.Int4Weight) -> torch.Tensor:
    """[K, N] fp32: the weight as gemlite's layout defines it."""
    k_packed, n = w.packed.shape
    q = torch.stack([(w.packed >> (4 * i)) & 15 for i in range(8)], dim=1).reshape(k_packed * 8, n).float()
    s = w.scales.float().repeat_interleave(w.group, 0)
    z = w.zeros.float().repeat_interleave(w.group, 0)
    return q * s + z if w.fma else (q - z) * s


def label(tiles: tuple[int, ...]) -> str:
    """mt_warps, or mt_warps_sN for a ring of N stages."""
    return "_".join(str(v) for v in tiles[:2]) + (f"_s{tiles[2]}" if len(tiles) > 2 else "")


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref).abs().max() / ref.abs().max())


def accuracy(quick: bool) -> None:
    cases = [("o", torch.bfloat16, 64), ("w2", torch.bfloat16, 64), ("w13", torch.bfloat16, 64),
             ("o", torch.float16, 64), ("w2", torch.bfloat16, 128), ("qkv", torch.bfloat16, 128)]  # fmt: skip
    for name, dtype, group in cases:
        quant.INT4_RECIPE["group"] = group
        n, k = SHAPES[name]
        _, w = make_layer(n, k, dtype)
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        ref = x.float() @ dequantized(w)
        fused.enable_pdl(True)
        tri = rel(gemv_int4.gemv_int4(x, w), ref)
        out = {"triton": tri}
        for cfg in cuda_int4.CONFIGS:
            try:
                out[f"tc_{label(cfg)}"] = rel(cuda_int4.gemv_int4_tc(x, w, tiles=cfg), ref)
            except ValueError as e:
                out[f"tc_{label(cfg)}"] = str(e)
        torch.cuda.synchronize()
        key = f"{name}_{str(dtype)[6:]}_g{group}"
        RESULTS["accuracy"][key] = out
        errs = [v for v in out.values() if isinstance(v, float)]
        print(f"accuracy {key:18s} triton {tri:.2e}  tc worst {max(errs):.2e}  best {min(errs):.2e}")
    quant.INT4_RECIPE["group"] = 64


def epilogues() -> None:
    """Each epilogue against `gemv_int4` (the Triton kernel the engine checks the layers with), the shapes
    of the decode step that would use it, and `cuda_int4.check` (what an engine runs before switching on)."""
    g = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    out: dict = {}
    for name, kw in (("w13 norm silu", {"norm_weight": g, "eps": 1e-5, "silu_pair": True}),
                     ("lm_head norm fp32", {"norm_weight": g, "eps": 1e-5, "out_dtype": torch.float32}),
                     ("o residual", {"residual": torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)}),
                     ("qkv plain", {})):  # fmt: skip
        n, k = SHAPES[name.split()[0]]
        _, w = make_layer(n, k)
        want = gemv_int4.gemv_int4(x, w, **kw)
        for cfg in cuda_int4.CONFIGS:
            try:
                out[f"{name} {cfg}"] = rel(cuda_int4.gemv_int4_tc(x, w, tiles=cfg, **kw), want.float())
            except ValueError as e:
                out[f"{name} {cfg}"] = str(e)
        errs = [v for key, v in out.items() if key.startswith(name) and isinstance(v, float)]
        print(f"epilogue {name:18s} against gemv_int4: worst {max(errs):.2e}")
    out["check"] = cuda_int4.check(torch.device("cuda"), torch.bfloat16)
    print(f"cuda_int4.check worst {out['check']:.2e}")
    RESULTS["epilogues"] = out


def rope_micro() -> None:
    """q/k/v with the RMSNorm prologue and the RoPE + cache epilogue, as the decode step runs it: Triton
    against the tensor-core kernel's tiles that fit a head of 64 (16 copies, one graph)."""
    from inferforge.llm.gemv import RopeCache

    heads, kv_heads, d = 32, 8, 64
    n, k = SHAPES["qkv"]
    ws = [make_layer(n, k)[1] for _ in range(16)]
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    g = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
    cos, sin = (torch.randn(4096, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kc, vc = (torch.zeros(64, 16, kv_heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    pos, slot = (torch.tensor([v], device="cuda") for v in (300, 77))
    rc = RopeCache(cos, sin, pos, slot, kc, vc, heads, kv_heads)
    kw = {"norm_weight": g, "eps": 1e-5, "rope_cache": rc}
    fused.enable_pdl(True)
    out = {"triton_us": graph_us([lambda w=w: gemv_int4.gemv_int4(x, w, **kw) for w in ws])}
    for cfg in [(1, 8), (1, 16), (2, 8), (2, 16)]:
        out[f"tc_{cfg[0]}_{cfg[1]}_us"] = graph_us(
            [lambda w=w, c=cfg: cuda_int4.gemv_int4_tc(x, w, tiles=c, **kw) for w in ws]
        )
    RESULTS["qkv_norm_rope"] = out
    print("qkv norm + rope (us): " + "  ".join(f"{key[:-3]} {v:5.1f}" for key, v in out.items()))


def micro(quick: bool, shapes: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    best: dict[str, tuple[int, int]] = {}
    for name, (n, k) in SHAPES.items():
        if shapes and name not in shapes:
            continue
        copies = 4 if name == "lm_head" else 16
        layers = [make_layer(n, k) for _ in range(copies)]
        ws = [w for _, w in layers]
        nbytes = ws[0].packed.numel() * 4 + ws[0].scales.numel() * 2 * 2
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        res: dict = {}
        fused.enable_pdl(True)
        us = graph_us([lambda w=w, x=x: gemv_int4.gemv_int4(x, w) for w in ws])
        res["triton_us"] = us
        print(f"{name:8s} {n}x{k} triton gemv_int4       {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s")
        fused.enable_pdl(False)
        bf = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        us_b = graph_us([lambda b=b, x=x: F.linear(x, b) for b in bf])
        res["cublas_bf16_us"] = us_b
        tbs = n * k * 2 / us_b / 1e6
        print(f"{name:8s} {n}x{k} cuBLAS bf16           {us_b:7.1f} us {tbs:5.2f} TB/s")
        del bf
        fused.enable_pdl(True)  # as the Triton kernel above and as in the step (M4-M7 timed it without)
        top = None
        for cfg in cuda_int4.CONFIGS[: 6 if quick else None]:
            try:
                fns = [lambda w=w, x=x, c=cfg: cuda_int4.gemv_int4_tc(x, w, tiles=c) for w in ws]
                us = graph_us(fns)
            except ValueError as e:
                res[f"tc_{label(cfg)}"] = str(e)
                continue
            res[f"tc_{label(cfg)}_us"] = us
            print(f"{name:8s} {n}x{k} tc {label(cfg):10s}          {us:7.1f} us "
                  f"{nbytes / us / 1e6:5.2f} TB/s", flush=True)  # fmt: skip
            if top is None or us < top[0]:
                top = (us, cfg)
        assert top is not None
        best[name] = top[1]
        res["best"] = {"us": top[0], "cfg": top[1], "bytes": nbytes}
        RESULTS["micro"][name] = res
        del layers, ws
        free()
    return best


def chain(best: dict[str, tuple[int, int]]) -> None:
    """One decode step's GEMVs with the epilogues the engine fuses (q/k/v plain here: RoPE stays on Triton;
    o and down add the residual; gate/up RMSNorm'd with SiLU x up; the LM head RMSNorm'd, fp32 out),
    distinct weights per layer, no attention: all Triton, all tensor-core (each shape's best tiles alone),
    and the engine's split (`cuda_int4.choice`)."""
    names = ["qkv", "o", "w13", "w2"]
    layers = [{nm: make_layer(*SHAPES[nm])[1] for nm in names} for _ in range(16)]
    head = make_layer(*SHAPES["lm_head"])[1]
    xs = {k: torch.randn(1, k, device="cuda", dtype=torch.bfloat16) for k in (2048, 8192)}
    g = torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
    res = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    norm = {"norm_weight": g, "eps": 1e-5}
    kws = {"qkv": {}, "o": {"residual": res}, "w13": {**norm, "silu_pair": True}, "w2": {"residual": res},
           "lm_head": {**norm, "out_dtype": torch.float32}}  # fmt: skip

    def calls(fn):
        out = [lambda w=lay[nm], nm=nm: fn(nm, xs[SHAPES[nm][1]], w) for lay in layers for nm in names]
        return [*out, lambda: fn("lm_head", xs[2048], head)]

    def triton_call(nm, x, w):
        return gemv_int4.gemv_int4(x, w, **kws[nm])

    def tc_call(nm, x, w):
        return cuda_int4.gemv_int4_tc(x, w, tiles=best[nm], **kws[nm])

    def engine_call(nm, x, w):
        return tc_call(nm, x, w) if cuda_int4.choice(*SHAPES[nm]) else triton_call(nm, x, w)

    fused.enable_pdl(True)
    out = {name: graph_us(calls(fn)) * 65 for name, fn in
           (("triton_us", triton_call), ("tc_us", tc_call), ("engine_split_us", engine_call))}  # fmt: skip
    RESULTS["chain"] = {**out, "tc_tiles": best}
    print("chain of 65 GEMVs (us): " + "  ".join(f"{k[:-3]} {v:7.1f}" for k, v in out.items()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sections", default="accuracy,epilogues,rope,micro,chain")
    ap.add_argument("--shapes", default="", help="micro: these of " + ",".join(SHAPES) + " (default all)")
    args = ap.parse_args()
    sections = args.sections.split(",")
    print(torch.cuda.get_device_name(), "library", cuda_int4.library()._name, flush=True)
    try:
        if "accuracy" in sections:
            accuracy(args.quick)
        if "epilogues" in sections:
            epilogues()
        if "rope" in sections:
            rope_micro()
        shapes = tuple(s for s in args.shapes.split(",") if s)
        best = micro(args.quick, shapes) if "micro" in sections or "chain" in sections else {}
        if "chain" in sections:
            chain(best)
    finally:
        write_json("bench_int4_tc.json", RESULTS)


if __name__ == "__main__":
    main()
