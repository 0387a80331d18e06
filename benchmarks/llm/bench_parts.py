"""Pieces of the decode step, for choosing kernels and finding where a step's time goes (CUDA only).

    python benchmarks/llm/bench_decode.py --sections attention,profile

`attention`: the torch reference (gathers every block of the table) against the Triton paged kernel, per
layer, at batch 1 and 64 and contexts of 256, 1,024 and 4,096 tokens, with split-KV, the block-table prefetch
and the split length varied, each captured in a CUDA graph. `profile`: the top CUDA
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
    """us per layer call; 1.2B shape: 32 query heads, 8 KV heads, head dim 64. Batch 1 and 64 at contexts
    256, 1,024 and 4,096, each captured in a CUDA graph: the torch reference (peer; its table as wide as the
    context needs, at least 64 blocks as before) and the Triton kernel with split-KV and the block-table
    prefetch each off and on (split-KV off is MAX_SPLITS=1; at batch 64 the grid fills the GPU unsplit)."""
    from inferforge.llm import fused

    min_split = triton_attn.MIN_SPLIT_TOKENS

    def timed(fn, args, max_splits: int, prefetch: bool, min_tokens: int = min_split) -> float:
        """Knobs are read at launch, so the captured graph keeps them; put back after capture."""
        saved = triton_attn.MAX_SPLITS, triton_attn.PREFETCH_TABLE, triton_attn.MIN_SPLIT_TOKENS
        triton_attn.MAX_SPLITS, triton_attn.PREFETCH_TABLE = max_splits, prefetch
        triton_attn.MIN_SPLIT_TOKENS = min_tokens
        try:
            replay = _graphed(lambda: fn(*args))
        finally:
            triton_attn.MAX_SPLITS, triton_attn.PREFETCH_TABLE, triton_attn.MIN_SPLIT_TOKENS = saved
        return cuda_time(replay, iters=50) * 1e6

    out: dict = {"pdl": fused.pdl_on()}
    dev, dt, on = torch.device("cuda"), torch.bfloat16, triton_attn.MAX_SPLITS
    variants = {"": (on, True, min_split), " no-split": (1, True, min_split),
                " no-prefetch": (on, False, min_split), " neither": (1, False, min_split),
                " min-split 128": (on, True, 128), " min-split 512": (on, True, 512)}  # fmt: skip
    max_blocks = 4096 // 16
    for b in (1, 64):
        out[f"splits b{b}"] = splits = triton_attn.num_splits(b, 8, dev)
        blocks = b * max_blocks + 1
        k = torch.randn(blocks, 16, 8, 64, device=dev, dtype=dt)
        v = torch.randn_like(k)
        q = torch.randn(b, 32, 64, device=dev, dtype=dt)
        bt = torch.randperm(blocks - 1, device=dev)[: b * max_blocks].add(1).view(b, max_blocks)
        for ctx in (256, 1024, 4096):
            lens = torch.full((b,), ctx, device=dev)
            peer = (q, k, v, bt[:, : max(64, ctx // 16)], lens, 0.125)
            us = timed(attention.decode_attention_torch, peer, on, True)
            out[f"torch gather b{b} ctx{ctx}"] = us
            row(f"decode attention torch gather, batch {b}, context {ctx} (us/layer)", f"{us:.1f}")
            for suffix, (max_splits, prefetch, min_tokens) in variants.items():
                if b > 1 and "min-split" in suffix:
                    continue
                us = timed(
                    triton_attn.paged_decode_attention, (q, k, v, bt, lens, 0.125), max_splits, prefetch,
                    min_tokens,
                )  # fmt: skip
                out[f"triton paged{suffix} b{b} ctx{ctx}"] = us
                label = f"triton paged{suffix or f' (splits {splits})'}"
                row(f"decode attention {label}, batch {b}, context {ctx} (us/layer)", f"{us:.1f}")
        free()
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
