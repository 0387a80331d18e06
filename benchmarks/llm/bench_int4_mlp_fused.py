"""int4 gate/up + down in one launch with a grid barrier (`int4_mlp_fused.cu`) against the engine's two
tensor-core kernels in a PDL chain (run O12).

16 layers of the 1.2B shape's MLP with random int4 weights (gemlite's layout, groups of 64; 25 MB a layer,
far more than L2), chained x -> x + down(silu(gate) * up) in one CUDA graph per variant, us a layer, median
of 30 replays, the two variants in turn. Layer 0's output of each is compared first.

    python benchmarks/llm/bench_int4_mlp_fused.py     # builds the library with nvcc; JSON under $OUT
"""

from __future__ import annotations

import ctypes
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import replay_us, write_json

HERE = Path(__file__).parent
LAYERS, HIDDEN, FFN = 16, 2048, 8192
SILU_PAIR, RESIDUAL = 3, 1


def build(out: Path) -> ctypes.CDLL:
    cmd = ["nvcc", "-gencode=arch=compute_90,code=sm_90", "-O3", "-std=c++17", "-shared", "-Xcompiler",
           "-fPIC", "-Xptxas", "-v", "-o", str(out), str(HERE / "int4_mlp_fused.cu")]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stderr[-3000:])
    regs = [ln for ln in done.stderr.splitlines() if "mlp_fused" in ln or "Used" in ln]
    print("\n".join(ln for ln in regs if "Used" in ln)[-400:])
    lib = ctypes.CDLL(str(out))
    lib.if_int4_gemv_tc.restype = lib.if_int4_mlp_fused.restype = ctypes.c_int
    p, i = ctypes.c_void_p, ctypes.c_int
    f, ll = ctypes.c_float, ctypes.c_longlong
    lib.if_int4_gemv_tc.argtypes = [p] * 7 + [i] * 7 + [f] + [i] * 3 + [p] * 7 + [ll] + [i] * 6
    lib.if_int4_mlp_fused.argtypes = [p] * 11 + [ctypes.c_float, i, i, p]  # fmt: skip
    return lib


def layer(gen: torch.Generator, dev: torch.device) -> dict:
    def packed(k: int, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(dev)
        s = (torch.rand(k // 64, n, generator=gen) * 0.01 + 1e-3).to(dev, torch.bfloat16)
        return w, s, (-8 * s.float()).to(torch.bfloat16)

    w13, s13, z13 = packed(HIDDEN, 2 * FFN)
    w2, s2, z2 = packed(FFN, HIDDEN)
    norm = (torch.rand(HIDDEN, generator=gen) + 0.5).to(dev, torch.bfloat16)
    return dict(w13=w13, s13=s13, z13=z13, w2=w2, s2=s2, z2=z2, norm=norm)


def main() -> None:
    dev = torch.device("cuda")
    lib = build(Path("/tmp/libif_int4_mlp_fused.so"))
    gen = torch.Generator().manual_seed(0)
    layers = [layer(gen, dev) for _ in range(LAYERS)]
    xs = [torch.randn(1, HIDDEN, generator=gen).to(dev, torch.bfloat16)] + [
        torch.empty(1, HIDDEN, device=dev, dtype=torch.bfloat16) for _ in range(LAYERS)
    ]
    u = torch.empty(1, FFN, device=dev, dtype=torch.bfloat16)
    barrier = torch.zeros(LAYERS, 2, device=dev, dtype=torch.int32)
    null = 0

    def two_kernels() -> None:
        st = torch.cuda.current_stream().cuda_stream
        for i, w in enumerate(layers):
            x, y = xs[i], xs[i + 1]
            w13 = (w["w13"].data_ptr(), w["s13"].data_ptr(), w["z13"].data_ptr())
            w2 = (w["w2"].data_ptr(), w["s2"].data_ptr(), w["z2"].data_ptr())
            for args in (
                (x.data_ptr(), w["norm"].data_ptr(), *w13, null, u.data_ptr(),
                 2 * FFN, HIDDEN, 64, 1, 0, SILU_PAIR, 0, 1e-5, 4, 8, 1, st),
                (u.data_ptr(), null, *w2, x.data_ptr(), y.data_ptr(),
                 HIDDEN, FFN, 64, 1, 0, RESIDUAL, 0, 1e-5, 1, 16, 1, st),
            ):  # fmt: skip
                code = lib.if_int4_gemv_tc(*args, *([null] * 6), 0, 0, 0, 0, 0, 4, 1)
                assert code == 0, code

    def fused() -> None:
        st = torch.cuda.current_stream().cuda_stream
        for i, w in enumerate(layers):
            code = lib.if_int4_mlp_fused(
                xs[i].data_ptr(), w["norm"].data_ptr(), w["w13"].data_ptr(), w["s13"].data_ptr(),
                w["z13"].data_ptr(), w["w2"].data_ptr(), w["s2"].data_ptr(), w["z2"].data_ptr(), u.data_ptr(),
                xs[i + 1].data_ptr(), barrier[i].data_ptr(), 1e-5, 1, 1, st,
            )  # fmt: skip
            assert code == 0, code

    results: dict = {"device": torch.cuda.get_device_name()}
    outs = {}
    for name, fn in (("two kernels", two_kernels), ("fused", fused)):
        fn()
        torch.cuda.synchronize()
        outs[name] = xs[1].float().clone()
        results[f"{name} finite"] = bool(torch.isfinite(xs[LAYERS].float()).all())
    diff = ((outs["fused"] - outs["two kernels"]).abs().max() / outs["two kernels"].abs().max()).item()
    results["layer0_rel_diff"] = diff
    results["barrier_counters_zero"] = int(barrier.abs().sum()) == 0
    print(f"layer 0 output, fused against two kernels: max relative difference {diff:.3g}; "
          f"counters back at zero: {results['barrier_counters_zero']}", flush=True)  # fmt: skip
    graphs = {}
    for name, fn in (("two kernels", two_kernels), ("fused", fused)):
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        graphs[name] = g
    for rep in range(2):
        for name, g in graphs.items():
            us = replay_us(g, LAYERS, warmup=5)
            results[f"{name} rep{rep} us_per_layer"] = us
            print(f"{name:12s} round {rep}: {us:6.2f} us a layer (gate/up + down)", flush=True)
    results["barrier_counters_zero_after_replays"] = int(barrier.abs().sum()) == 0
    write_json("int4_mlp_fused.json", results)


if __name__ == "__main__":
    main()
