"""Batch-64 decode attention alone, as the decode step meets it: 16 layers' caches (distinct, so the 50 MB L2
cannot serve them) called in one CUDA graph with programmatic dependent launch, for tiles, warps and
software-pipelining depths of `triton_attn` (TILE, WARPS, STAGES for "large_batch").

    python benchmarks/llm/bench_attn_b64.py [--contexts 192,256] [--grid 32,64,128:2,4,8:1,2,3,4]

Why: the batch-64 step's attention takes ~16.4 us a layer (O2's timeline) for ~25-39 MB of keys and values,
1.5-2.3 TB/s, where the GEMMs beside it reach 2.2-2.5; tiles and grid order changed nothing in the step (O2,
O3). Prints us per layer call, TB/s over the K/V bytes read, and each compiled variant's registers and shared
memory (what bounds programs per SM). Writes `attn_b64.json` under $OUT.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, write_json

from inferforge.llm import fused, triton_attn

LAYERS, BATCH, KV_HEADS, HEADS, D, BS = 16, 64, 8, 32, 64, 16


def _caches(ctx: int, dev: torch.device) -> list[tuple[torch.Tensor, ...]]:
    blocks = BATCH * -(-ctx // BS) + 1
    out = []
    for _ in range(LAYERS):
        k = torch.randn(blocks, BS, KV_HEADS, D, device=dev, dtype=torch.bfloat16)
        bt = torch.randperm(blocks - 1, device=dev).add(1).view(BATCH, -1)
        out.append((k, torch.randn_like(k), bt))
    return out


def _time(caches, q, lens) -> float:  # type: ignore[no-untyped-def]
    def step() -> None:
        for k, v, bt in caches:
            triton_attn.paged_decode_attention(q, k, v, bt, lens, 0.125)

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return cuda_time(graph.replay, iters=30) * 1e6 / LAYERS


def _compiled() -> list[dict]:
    """Registers and shared memory of every compiled variant of the kernel so far."""
    rows = []
    for cache in triton_attn._paged_decode_kernel.device_caches.values():
        for kernel in cache[0].values():
            md = kernel.metadata
            rows.append({"warps": md.num_warps, "stages": md.num_stages, "regs": kernel.n_regs,
                         "shared": md.shared})  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="192,256")
    ap.add_argument("--grid", default="32,64,128:2,4,8:1,2,3,4", help="tiles:warps:stages")
    a = ap.parse_args()
    dev = torch.device("cuda")
    fused.enable_pdl(torch.cuda.get_device_capability(dev) >= (9, 0))
    tiles, warps, stages = ([int(x) for x in part.split(",")] for part in a.grid.split(":"))
    q = torch.randn(BATCH, HEADS, D, device=dev, dtype=torch.bfloat16)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "pdl": fused.pdl_on()}
    for ctx in (int(c) for c in a.contexts.split(",")):
        caches = _caches(ctx, dev)
        lens = torch.full((BATCH,), ctx, device=dev, dtype=torch.long)
        mb = 2 * BATCH * ctx * KV_HEADS * D * 2 / 1e6
        base = _time(caches, q, lens)
        head = f"context {ctx}: {mb:.1f} MB of K/V a layer; as configured {base:.2f} us"
        print(f"{head} ({mb / base:.2f} TB/s)", flush=True)
        res[f"ctx{ctx} default"] = base
        for tile, w, st in itertools.product(tiles, warps, stages):
            saved = dict(triton_attn.TILE), dict(triton_attn.WARPS), dict(triton_attn.STAGES)
            triton_attn.TILE["large_batch"], triton_attn.WARPS["large_batch"] = tile, w
            triton_attn.STAGES["large_batch"] = st
            try:
                us = _time(caches, q, lens)
            except Exception as exc:  # a tile the kernel cannot build (shared memory): say so, go on
                print(f"  tile {tile} warps {w} stages {st}: {type(exc).__name__}: {str(exc)[:120]}")
                continue
            finally:
                triton_attn.TILE.update(saved[0]), triton_attn.WARPS.update(saved[1])
                triton_attn.STAGES.update(saved[2])
            res[f"ctx{ctx} tile{tile} warps{w} stages{st}"] = us
            print(f"  tile {tile:3d} warps {w} stages {st}: {us:6.2f} us ({mb / us:.2f} TB/s)", flush=True)
        res[f"ctx{ctx} again default"] = again = _time(caches, q, lens)
        print(f"  as configured, again: {again:.2f} us")
        del caches
        torch.cuda.empty_cache()
    res["compiled"] = _compiled()
    for r in res["compiled"]:
        print("  compiled", r)
    write_json("attn_b64.json", res)


if __name__ == "__main__":
    main()
