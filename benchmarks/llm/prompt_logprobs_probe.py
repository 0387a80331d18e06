"""Where a prompt-logprobs request's extra time goes: torch.profiler over one 512-token request with
prompt_logprobs=1 on the random 1.2B folder (after warm-up), top operators by host and device time, and the
allocator's cudaMalloc / cudaFree count.

    python benchmarks/llm/prompt_logprobs_probe.py
"""

from __future__ import annotations

import cProfile
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def main() -> None:
    folder = make_random_1b(Path(tempfile.gettempdir()) / "if_llama1b")
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192))
    rng = random.Random(0)

    def one(k: int | None, rid: str) -> float:
        prompt = tuple(rng.randrange(100, 500) for _ in range(512))
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.generate([EngineRequest(rid, prompt, SamplingParams(max_tokens=1, prompt_logprobs=k))])
        return (time.perf_counter() - t0) * 1e3

    for i in range(6):
        one(1 if i % 2 else None, f"w{i}")
    stats0 = torch.cuda.memory_stats()
    print(
        "ms without / with:",
        [round(one(None, f"a{i}"), 2) for i in range(3)],
        [round(one(1, f"b{i}"), 2) for i in range(3)],
    )
    stats1 = torch.cuda.memory_stats()
    print("cudaMalloc retries / num_alloc_retries / segments allocated during the 6 requests:",
          stats1.get("num_alloc_retries", 0) - stats0.get("num_alloc_retries", 0),
          stats1.get("segment.all.allocated", 0) - stats0.get("segment.all.allocated", 0),
          "reserved GB", round(stats1.get("reserved_bytes.all.current", 0) / 1e9, 2),
          "free GB", round(torch.cuda.mem_get_info()[0] / 1e9, 2))  # fmt: skip
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        one(1, "p")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=14, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=10, max_name_column_width=60))
    batch = [tuple(rng.randrange(100, 500) for _ in range(512)) for _ in range(64)]
    scored = SamplingParams(max_tokens=1, prompt_logprobs=1)
    reqs = [EngineRequest(f"s{i}", p, scored) for i, p in enumerate(batch)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        eng.generate(reqs)
        print(f"64 x 512 scored in {(time.perf_counter() - t0) * 1e3:.1f} ms (under the profiler)")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=16, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=60))
    for k in (None, 1):  # the host's side of the same batch: cProfile of the engine loop
        batch = [tuple(rng.randrange(100, 500) for _ in range(512)) for _ in range(64)]
        reqs = [
            EngineRequest(f"c{k}{i}", p, SamplingParams(max_tokens=1, prompt_logprobs=k))
            for i, p in enumerate(batch)
        ]
        host = cProfile.Profile()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        host.enable()
        eng.generate(reqs)
        host.disable()
        print(f"prompt_logprobs={k}: 64 x 512 in {(time.perf_counter() - t0) * 1e3:.1f} ms under cProfile")
        pstats.Stats(host).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
