"""What prompt logprobs cost on the GPU (`SamplingParams.prompt_logprobs`, the OpenAI route's `echo` with
`logprobs`): the way an evaluation harness scores a model through a server.

    python benchmarks/llm/bench_prompt_logprobs.py [--rounds 2]

Model: the Llama-3.2-1B shape with random bf16 weights (common.make_random_1b), one engine (prefix caching
on, as served). Per setting, in turn, `--rounds` times:
- time to the first output of one 512-token prompt at low load (max_tokens 1; median of 10), without prompt
  logprobs, with 1 alternative a position, with 5;
- scoring throughput: 64 distinct 512-token prompts added at once, max_tokens 1: prompt tokens a second,
  without and with prompt logprobs (1 alternative).
The peer is the same engine on the same prompts without prompt logprobs. Prints a table; writes
bench_prompt_logprobs.json under $OUT.
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
from common import make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def prompts(n: int, length: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(100, 500) for _ in range(length)) for _ in range(n)]


def first_output_ms(eng: LLMEngine, prompt: tuple[int, ...], k: int | None, rid: str) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    res = eng.generate([EngineRequest(rid, prompt, SamplingParams(max_tokens=1, prompt_logprobs=k))])
    dt = (time.perf_counter() - t0) * 1e3
    lps = res[rid][0][0].prompt_logprobs
    assert (lps is None) == (k is None) and (k is None or len(lps) == len(prompt) - 1)
    return dt


def scoring_tok_s(eng: LLMEngine, batch: list[tuple[int, ...]], k: int | None, tag: str) -> float:
    reqs = [
        EngineRequest(f"{tag}{i}", p, SamplingParams(max_tokens=1, prompt_logprobs=k))
        for i, p in enumerate(batch)
    ]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.generate(reqs)
    return sum(map(len, batch)) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--length", type=int, default=512)
    a = ap.parse_args()
    folder = make_random_1b(Path(tempfile.gettempdir()) / "if_llama1b")
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192))
    for i, p in enumerate(prompts(4, a.length, 0)):  # warm-up, both paths
        first_output_ms(eng, p, None if i % 2 else 1, f"w{i}")
    rows = []
    for rnd in range(a.rounds):
        for k in (None, 1, 5):  # a fresh prompt each time: nothing comes from the prefix cache
            ttft = [
                first_output_ms(eng, p, k, f"t{rnd}{k}{i}")
                for i, p in enumerate(prompts(10, a.length, 100 + rnd))
            ]
            rows.append(
                {"round": rnd, "what": "ttft_ms", "prompt_logprobs": k, "value": statistics.median(ttft)}
            )
            print(
                f"round {rnd} TTFT {a.length} tokens, prompt_logprobs={k}: {rows[-1]['value']:.2f} ms",
                flush=True,
            )
        for k in (None, 1):
            tok_s = scoring_tok_s(eng, prompts(64, a.length, 200 + rnd * 10 + (k or 0)), k, f"s{rnd}{k}-")
            rows.append({"round": rnd, "what": "scoring_tok_s", "prompt_logprobs": k, "value": tok_s})
            print(
                f"round {rnd} scoring 64 x {a.length}, prompt_logprobs={k}: {tok_s:,.0f} prompt tok/s",
                flush=True,
            )
    write_json("bench_prompt_logprobs.json", {"rows": rows, "device": torch.cuda.get_device_name()})


if __name__ == "__main__":
    main()
