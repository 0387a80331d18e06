"""gemlite's 8-bit kernels at batch 64 against cuBLAS bf16, per product of the 1B shape, per gemlite kernel.

    python benchmarks/llm/bench_gemlite_b64.py

At batch 64 the int8 and fp8 engines run slower than bf16 (G11: graphs 2,172 and 1,883 us against 1,565):
gemlite picks its "GEMM" kernel from 64 rows up (`gemlite.core.get_matmul_type`) and "GEMM_SPLITK" below.
Each product (q/k/v, o, gate/up, down, LM head) is timed in one CUDA graph of 8 calls on 8 weight copies (so
L2 holds none of them; the LM head on 2), CUDA events around 20 replays after warm-up, median; us per call and
TB/s over the weight bytes. Checked first: each kernel's output against the layer's dequantized weights
(relative error). Prints a table; writes gemlite_b64.json under $OUT.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import capture_graph, cuda_time, write_json

from inferforge.llm.quant import load_tuned_configs, quantize_linear

SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate/up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}  # fmt: skip
ROWS = 64


def main() -> None:
    dev = torch.device("cuda")
    load_tuned_configs(dev)
    torch.backends.cuda.preferred_blas_library("cublaslt")
    out: dict = {"device": torch.cuda.get_device_name(dev), "rows": ROWS}
    t0 = time.perf_counter()
    for name, (n, k) in SHAPES.items():
        copies = 2 if name == "lm_head" else 8
        linears = [torch.nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16) for _ in range(copies)]
        for lin in linears:
            torch.nn.init.normal_(lin.weight, std=0.02)
        x = torch.randn(ROWS, k, device=dev, dtype=torch.bfloat16)
        res: dict = {}
        g = capture_graph([lambda lin=lin, x=x: torch.mm(x, lin.weight.t()) for lin in linears])
        us = cuda_time(g.replay) * 1e6 / copies
        res["cublas_bf16_us"], res["cublas_bf16_tbs"] = us, n * k * 2 / us / 1e6
        for fmt in ("int8", "fp8"):
            layers = [quantize_linear(lin, fmt) for lin in linears]
            want = x.float() @ linears[0].weight.float().t()
            for mt in ("GEMM", "GEMM_SPLITK"):
                try:
                    got = layers[0].forward_manual(x, mt).float()
                    res[f"{fmt}_{mt}_rel_err"] = ((got - want).norm() / want.norm()).item()
                    g = capture_graph([lambda q=q, x=x, mt=mt: q.forward_manual(x, mt) for q in layers])
                    us = cuda_time(g.replay) * 1e6 / copies
                    res[f"{fmt}_{mt}_us"], res[f"{fmt}_{mt}_tbs"] = us, n * k / us / 1e6
                except Exception as exc:  # a kernel that fails on a shape is a result, not the end of the run
                    res[f"{fmt}_{mt}_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            del layers
        out[name] = res
        line = "  ".join(f"{a} {b:.3g}" for a, b in res.items() if isinstance(b, float))
        print(f"{name:8s} {line}", flush=True)
        del linears
        torch.cuda.empty_cache()
    out["seconds"] = time.perf_counter() - t0
    write_json("gemlite_b64.json", out)


if __name__ == "__main__":
    main()
