"""Prefix caching on the H100: requests sharing a long system prompt, with `enable_prefix_caching` off and on.

    cd benchmarks/llm && python bench_prefix.py

Model: the Llama-3.2-1B shape with random bf16 weights (common.make_random_1b). Prompts: one shared prefix
(`--prefix` tokens) plus a distinct suffix (`--suffix` tokens) each. Per setting, twice in turn, each in a
fresh engine: time to first token at low load (one request at a time, max_tokens 1: median of `--ttft-reps`)
and a batch of `--requests` requests added at once (max_tokens `--gen`): wall time, prompt and generated
tokens/s. Prints a table; writes bench_prefix.json under $OUT.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def prompts(n: int, prefix: tuple[int, ...], suffix: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [prefix + tuple(rng.randrange(100, 500) for _ in range(suffix)) for _ in range(n)]


def first_token_s(eng: LLMEngine, prompt: tuple[int, ...], rid: str) -> float:
    t0 = time.perf_counter()
    eng.add_request(
        EngineRequest(rid, prompt, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    )
    while True:
        if any(o.new_token_ids for o in eng.step()):
            dt = time.perf_counter() - t0
            while eng.has_unfinished():
                eng.step()
            return dt


def run(folder: Path, caching: bool, a: argparse.Namespace, seed: int) -> dict:
    cfg = EngineConfig(device="cuda", max_num_seqs=64, max_model_len=4096, enable_prefix_caching=caching)
    eng = LLMEngine(folder, cfg)
    prefix = tuple(random.Random(seed).randrange(100, 500) for _ in range(a.prefix))
    for i, p in enumerate(prompts(4, prefix, a.suffix, seed + 1)):  # warm-up (and, when on, the cache)
        first_token_s(eng, p, f"w{i}")
    ttft = [
        first_token_s(eng, p, f"t{i}") for i, p in enumerate(prompts(a.ttft_reps, prefix, a.suffix, seed + 2))
    ]
    params = SamplingParams(max_tokens=a.gen, temperature=0.0, ignore_eos=True)
    batch = prompts(a.requests, prefix, a.suffix, seed + 3)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = eng.generate([EngineRequest(f"b{i}", p, params) for i, p in enumerate(batch)])
    wall = time.perf_counter() - t0
    generated = sum(len(o.new_token_ids) for seqs in res.values() for outs in seqs for o in outs)
    out = {
        "ttft_ms_median": statistics.median(ttft) * 1e3,
        "batch_wall_s": wall,
        "batch_generated_tok_s": generated / wall,
        "batch_prompt_tok_s": sum(map(len, batch)) / wall,
        "cached_tokens_total": eng.stats().prefix_cached_tokens_total,
    }
    del eng
    free()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=1024)
    ap.add_argument("--suffix", type=int, default=32)
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--ttft-reps", type=int, default=10)
    a = ap.parse_args()
    folder = make_random_1b(Path(tempfile.mkdtemp()))
    results: dict = {"device": torch.cuda.get_device_name(0), "args": vars(a)}
    for rep in range(2):
        for caching in (False, True):
            r = results[f"caching={caching} rep{rep}"] = run(folder, caching, a, seed=rep)
            print(
                f"prefix caching {caching!s:5s} rep{rep}: TTFT {r['ttft_ms_median']:.1f} ms; batch of "
                f"{a.requests}: {r['batch_wall_s']:.2f} s, {r['batch_generated_tok_s']:,.0f} generated, "
                f"{r['batch_prompt_tok_s']:,.0f} prompt tok/s; cached tokens {r['cached_tokens_total']:,}",
                flush=True,
            )
            write_json("bench_prefix.json", results)


if __name__ == "__main__":
    main()
