"""A prompt longer than a step: its time to first token when it is split over prompt steps of 2,048 tokens
against one step of 8,192, and each step's wall time (the later chunk attends to the keys the earlier one
cached), bf16, the 1.2B Llama shape with random weights, prefix caching off so every repetition computes.

Per setting, in turn, a fresh engine: one request at a time on an idle engine, max_tokens 1, `--reps`
distinct random prompts of each length; median TTFT (add to first token, wall clock) and the median wall
time of each prompt step.

    python benchmarks/llm/bench_chunked_prompt.py [--lengths 2048,4000] [--reps 7]   # JSON under $OUT
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b, write_json
from engine_bench import bench_engine

from inferforge.llm.protocol import EngineRequest, SamplingParams


def one_prompt(eng, ids: tuple[int, ...], name: str) -> tuple[float, list[float]]:
    """TTFT (s) and each step's wall time (s) until the first token."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    eng.add_request(EngineRequest(name, ids, params))
    steps, ttft = [], None
    while eng.has_unfinished():
        s0 = time.perf_counter()
        outs = eng.step()
        steps.append(time.perf_counter() - s0)
        if ttft is None and any(o.new_token_ids for o in outs):
            ttft = time.perf_counter() - t0
    assert ttft is not None
    return ttft, steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4000")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    folder = make_random_1b(Path("/tmp/inferforge_llama1b"))
    gen = torch.Generator().manual_seed(0)
    res: dict = {"device": torch.cuda.get_device_name()}

    def prompt(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(100, 5000, (n,), generator=gen).tolist())

    for rnd in range(2):
        for budget in (2048, 8192):
            config = {"max_num_batched_tokens": budget, "max_model_len": 4096, "max_num_seqs": 8}
            eng = bench_engine(folder, None, decode_buckets=(1,), **config)
            one_prompt(eng, prompt(max(lengths)), "warm")
            for n in lengths:
                runs = [one_prompt(eng, prompt(n), f"p{n}-{r}") for r in range(args.reps)]
                ttft = statistics.median(t for t, _ in runs) * 1e3
                per_step = zip(*(s for _, s in runs), strict=False)
                steps = [round(statistics.median(x) * 1e3, 2) for x in per_step]
                res[f"round {rnd} budget {budget} prompt {n}"] = {"ttft_ms": ttft, "steps_ms": steps}
                print(f"round {rnd}, {budget:5d} tokens a step, prompt {n:5d}: TTFT {ttft:7.2f} ms, "
                      f"steps {steps} ms", flush=True)  # fmt: skip
            del eng
            free()
    write_json("bench_chunked_prompt.json", res)


if __name__ == "__main__":
    main()
