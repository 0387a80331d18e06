"""The streaming batch-1 GEMV (`llm/gemv_stream.py`) against `gemv.gemv`, per product, then in the engine.

    cd benchmarks/llm && python bench_stream.py [--engine-only]

Part 1, per product of the 1.2B shape, bf16 and int8 weights (per-channel scale), each with its decode-step
prologue and epilogue: 16 weight copies (4 for the LM head) called in a chain inside one CUDA graph with
programmatic dependent launch, as in the decode step (method of bench_gemv.py); `gemv.gemv` at its default
tiles against a sweep of stream configurations. Part 2: the best configuration per product and format
installed in `gemv_stream.TUNED`, batch-1 engines with and without it, twice in turn (graph replay us and
tokens/s). Prints a table; writes bench_stream.json under $OUT.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gemv import graph_us, quantize
from common import free, make_random_1b, write_json
from engine_bench import RESULTS, engine_numbers

from inferforge.llm import fused, gemv, gemv_stream

PRODUCTS = {  # name: (N, K, gemv keyword arguments besides the weight)
    "o": (2048, 2048, "residual"), "w13": (16384, 2048, "norm_silu"), "w2": (2048, 8192, "residual"),
    "lm_head": (128256, 2048, "norm_logits"),
}  # fmt: skip
ROWS: list[str] = []


def row(text: str) -> None:
    ROWS.append(text)
    print(text, flush=True)


def kwargs_for(kind: str, k: int, n: int, dev: torch.device) -> dict:
    bf = torch.bfloat16
    if kind == "residual":
        return {"residual": torch.randn(1, n, device=dev, dtype=bf)}
    norm = {"norm_weight": torch.ones(k, device=dev, dtype=bf), "eps": 1e-5}
    return {**norm, "silu_pair": True} if kind == "norm_silu" else {**norm, "out_dtype": torch.float32}


def sweep(k: int, elem: int, sms: int) -> list[gemv_stream.StreamConfig]:
    rows = 16384 // (k * elem)  # 8 KB-16 KB tiles
    out = []
    for bn, st, per_sm, warps in itertools.product((rows, 2 * rows), (3, 5), (1, 2), (4, 8)):
        if bn * k * elem * (st - 1) * per_sm > 200_000:
            continue
        out.append(gemv_stream.StreamConfig(bn, st, sms * per_sm, warps))
    return out


def bench_product(name: str, fmt: str, sms: int) -> dict:
    n, k, kind = PRODUCTS[name]
    dev = torch.device("cuda")
    copies = 4 if name == "lm_head" else 16
    ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    ws = [quantize(w, "int8") for w in ws] if fmt == "int8" else [(w, None) for w in ws]
    x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
    kw = kwargs_for(kind, k, n, dev)
    mb = ws[0][0].numel() * ws[0][0].element_size() / 1e6
    fused.enable_pdl(True)
    out: dict = {}
    base = graph_us([lambda w=w, s=s: gemv.gemv(x, w, scale=s, **kw) for w, s in ws])
    ref = gemv.gemv(x, ws[0][0], scale=ws[0][1], **kw).float()
    out["gemv_us"] = base
    row(f"{name:8s} {fmt:5s} gemv default                 {base:7.1f} us {mb / base:5.2f} TB/s")
    best = None
    for cfg in sweep(k, ws[0][0].element_size(), sms):
        label = f"b{cfg.block_n}s{cfg.stages}p{cfg.programs}w{cfg.num_warps}"
        try:
            fn = [lambda w=w, s=s, c=cfg: gemv_stream.stream_gemv(
                x, w, scale=s, block_n=c.block_n, stages=c.stages, programs=c.programs, num_warps=c.num_warps,
                **kw) for w, s in ws]  # fmt: skip
            got = fn[0]().float()
            err = ((got - ref).norm() / ref.norm()).item()
            us = graph_us(fn)
        except Exception as exc:  # out of shared memory and the like: skip the configuration
            row(f"{name:8s} {fmt:5s} stream {label:22s} failed: {str(exc)[:80]}")
            continue
        out[label] = {"us": us, "rel_err": err}
        row(f"{name:8s} {fmt:5s} stream {label:22s} {us:7.1f} us {mb / us:5.2f} TB/s  err {err:.1e}")
        if err < 1e-2 and (best is None or us < best[0]):
            best = (us, cfg)
    if best is not None:
        out["best"] = {"us": best[0], **best[1].__dict__}
        row(f"{name:8s} {fmt:5s} BEST {best[1]} {best[0]:.1f} us vs gemv {base:.1f} ({base / best[0]:.2f}x)")
    fused.enable_pdl(False)
    del ws
    free()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--products", default="o,w13,w2,lm_head")
    ap.add_argument("--formats", default="int8,bf16")
    ap.add_argument("--engine-formats", default="int8,bf16")
    args = ap.parse_args()
    t0 = time.perf_counter()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results: dict = {"device": torch.cuda.get_device_name(0), "sms": sms, "products": {}}
    chosen: dict[str, dict] = {}
    for fmt in args.formats.split(","):
        for name in args.products.split(","):
            res = bench_product(name, fmt, sms)
            results["products"][f"{name}_{fmt}"] = res
            if "best" in res and res["best"]["us"] < res["gemv_us"]:
                n, k, _ = PRODUCTS[name]
                b = res["best"]
                key = (n, k, 1 if fmt == "int8" else 2)
                cfg = gemv_stream.StreamConfig(b["block_n"], b["stages"], b["programs"], b["num_warps"])
                chosen.setdefault(fmt, {})[key] = cfg
            write_json("bench_stream.json", results)
    results["chosen"] = {f: {str(k): v.__dict__ for k, v in c.items()} for f, c in chosen.items()}
    row(f"chosen: {results['chosen']}  ({time.perf_counter() - t0:.0f} s)")
    folder = make_random_1b(Path(tempfile.mkdtemp()))
    for rep in range(2):
        for fmt in args.engine_formats.split(","):
            for on in (False, True):
                gemv_stream.TUNED.clear()
                if on:
                    gemv_stream.TUNED.update(chosen.get(fmt, {}))
                quant = None if fmt == "bf16" else fmt
                res = engine_numbers(folder, quant, (1,), note=f" [stream {on}]")
                results[f"engine {fmt} stream={on} rep{rep}"] = res
                us, rate = res.get("graph_b1_us", 0), res.get("decode_tok_s_b1", 0)
                row(f"engine {fmt} stream={on} rep{rep}: graph {us:.0f} us, {rate:,.0f} tok/s")
                write_json("bench_stream.json", results)
    gemv_stream.TUNED.clear()
    results["seconds"] = time.perf_counter() - t0
    results["engine_rows"] = RESULTS
    write_json("bench_stream.json", results)
    print("\n".join(ROWS))


if __name__ == "__main__":
    main()
