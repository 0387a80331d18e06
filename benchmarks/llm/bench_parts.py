"""Pieces of the decode step, for choosing kernels and finding where a step's time goes (CUDA only).

    python benchmarks/llm/bench_decode.py --sections attention,profile

`attention`: the torch reference (gathers every block of the table) against the Triton paged kernel, per
layer, at batch 1 and 64 and two context lengths, each captured in a CUDA graph. `profile`: the top CUDA
kernels of eager batch-1 decode steps, plain and with `compile_decode`, from `torch.profiler`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from common import cuda_time, free

from inferforge.llm import attention, triton_attn


def _graphed(fn):
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def attention_section(row) -> dict:
    """us per layer call; 1.2B shape: 32 query heads, 8 KV heads, head dim 64, max_model_len 1024."""
    out = {}
    dev, dt = torch.device("cuda"), torch.bfloat16
    for b in (1, 64):
        for ctx in (256, 1024):
            blocks = b * 64 + 1
            k = torch.randn(blocks, 16, 8, 64, device=dev, dtype=dt)
            v = torch.randn_like(k)
            q = torch.randn(b, 32, 64, device=dev, dtype=dt)
            bt = torch.randperm(blocks - 1, device=dev)[: b * 64].add(1).view(b, 64)
            lens = torch.full((b,), ctx, device=dev)
            for name, fn in (("torch gather", attention.decode_attention_torch),
                             ("triton paged", triton_attn.paged_decode_attention)):  # fmt: skip
                args = (q, k, v, bt, lens, 0.125)
                us = cuda_time(_graphed(lambda fn=fn, args=args: fn(*args)), iters=50) * 1e6
                out[f"{name} b{b} ctx{ctx}"] = us
                row(f"decode attention {name}, batch {b}, context {ctx} (us/layer)", f"{us:.1f}")
    return out


def profile_section(folder: Path, row) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    out = {}
    for compiled in (False, True):
        config = EngineConfig(
            device="cuda", max_num_seqs=1, kv_cache_tokens=4096, max_model_len=1024,
            compile_decode=compiled, cuda_graphs=False,
        )  # fmt: skip
        eng = LLMEngine(folder, config)
        eng.add_request(
            EngineRequest("p", tuple(range(100, 116)), SamplingParams(max_tokens=64, ignore_eos=True))
        )
        for _ in range(8):
            eng.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                eng.step()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
        out[f"compiled={compiled}"] = table
        row(f"profile compiled={compiled}: see bench_decode.json", "")
        print(table)
        del eng
        free()
    return out
