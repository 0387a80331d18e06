"""What bounds an int8 batch-1 GEMV on the H100: the same tiles with less and less work per weight.

    cd benchmarks/llm && python bench_int8_diag.py

16 weight copies per shape in one CUDA graph (no PDL), us per call and TB/s of the int8 bytes, for
`int8_diag_kernels.diag_kernel` (OP 0: integer sum of the raw bytes; 3 and 6: gemv's int8 modes; 10: fp16 by
bits into a tensor-core dot), against `gemv.gemv` (int8 and bf16 weights). Writes bench_int8_diag.json under
$OUT.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_gemv import quantize
from common import graph_us, write_json
from int8_diag_kernels import diag_kernel

from inferforge.llm import fused, gemv

CONFIGS = [  # (OP, BLOCK_N, BLOCK_K, warps)
    (0, 16, 2048, 4), (0, 8, 2048, 4), (0, 32, 1024, 4), (3, 16, 2048, 4), (6, 16, 2048, 4), (6, 8, 2048, 4),
    (6, 16, 1024, 8), (10, 64, 256, 4), (10, 64, 512, 4), (10, 128, 256, 8),
]  # fmt: skip


def main() -> None:
    dev = torch.device("cuda")
    fused.enable_pdl(False)
    out: dict = {"device": torch.cuda.get_device_name(0)}
    for name, (n, k) in {"w13": (16384, 2048), "w2": (2048, 8192), "o": (2048, 2048)}.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(16)]
        qs = [quantize(w, "int8") for w in ws]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        mb = n * k / 1e6
        us = graph_us([lambda w=w, x=x: gemv.gemv(x, w) for w in ws])
        print(f"{name} bf16 gemv {us:7.1f} us {2 * mb / us:5.2f} TB/s (bf16 bytes)", flush=True)
        out[f"{name}_bf16_gemv"] = us
        us = graph_us([lambda q=q, s=s, x=x: gemv.gemv(x, q, scale=s) for q, s in qs])
        print(f"{name} int8 gemv {us:7.1f} us {mb / us:5.2f} TB/s", flush=True)
        out[f"{name}_int8_gemv"] = us
        y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        want = (x.float() @ qs[0][0].float().T).flatten()
        for op, bn, bk, warps in CONFIGS:
            bk = min(bk, k)
            label = f"op{op} {bn}x{bk} w{warps}"
            try:

                def call(q, op=op, bn=bn, bk=bk, warps=warps, x=x, y=y, n=n, k=k):
                    diag_kernel[(n // bn,)](x, q, y, K=k, BLOCK_N=bn, BLOCK_K=bk, OP=op, num_warps=warps)

                call(qs[0][0])
                err = ((y.float().flatten() - want).norm() / want.norm()).item() if op else float("nan")
                us = graph_us([lambda q=q: call(q) for q, _ in qs])
            except Exception as exc:
                print(f"{name} {label} failed: {str(exc)[:100]}", flush=True)
                continue
            out[f"{name}_{label}"] = {"us": us, "err": err}
            print(f"{name} {label:22s} {us:7.1f} us {mb / us:5.2f} TB/s err {err:.1e}", flush=True)
        del ws, qs
        torch.cuda.empty_cache()
        write_json("bench_int8_diag.json", out)


if __name__ == "__main__":
    main()
