"""Each tensor-core int4 tile configuration on the gate/up shape (16384 x 2048, SiLU pair, RMSNorm) and the
down shape (2048 x 8192, residual): its error against the dequantized product in fp32 and its time, 16
calls in a CUDA graph with PDL (us a call, median of 30 replays). Written for run P8: one quad a step against
two (`cuda_int4.CONFIGS`' fourth element).

    python benchmarks/llm/probe_int4_pairs.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import replay_us, write_json

from inferforge.llm import cuda_int4, fused
from inferforge.llm.gemv_int4 import gemv_int4


def main() -> None:
    dev, gen = torch.device("cuda"), torch.Generator().manual_seed(0)
    fused.enable_pdl(True)
    out: dict = {}
    for (n, k), kw, tiles_list in (
        ((16384, 2048), {"silu_pair": True, "eps": 1e-5}, [(4, 8, 4), (4, 8, 4, 2)]),
        ((2048, 8192), {"residual": True}, [(1, 16, 4), (1, 16, 4, 2)]),
        ((4096, 2048), {}, [(1, 16, 4), (1, 16, 4, 2), (4, 8, 4), (4, 8, 4, 2)]),
    ):
        w = cuda_int4._random_weight(n, k, 64, dev, torch.bfloat16, gen)
        x = torch.randn(1, k, generator=gen).to(dev, torch.bfloat16)
        args = dict(kw)
        if args.pop("residual", False):
            args["residual"] = torch.randn(1, n, generator=gen).to(dev, torch.bfloat16)
        if args.get("silu_pair"):
            args["norm_weight"] = (torch.rand(k, generator=gen) + 0.5).to(dev, torch.bfloat16)
        want = gemv_int4(x, w, **args).float()
        for tiles in tiles_list:
            got = cuda_int4.gemv_int4_tc(x, w, tiles=tiles, **args).float()
            err = ((got - want).abs().max() / want.abs().max()).item()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                for _ in range(16):
                    cuda_int4.gemv_int4_tc(x, w, tiles=tiles, **args)
            us = replay_us(g, 16)
            out[f"{n}x{k} {tiles}"] = {"rel_err": err, "us": us}
            print(f"{n}x{k} tiles {tiles}: error {err:.2e}, {us:.2f} us a call", flush=True)
    write_json("probe_int4_pairs.json", out)


if __name__ == "__main__":
    main()
