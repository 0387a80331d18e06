"""What a prompt step costs when a wave of 64 requests arrives in pieces, as through the HTTP server.

    cd benchmarks/llm && python wave_steps_probe.py

T13's engine trace (docs/llm-runs.md) saw the server's waves reach the engine in 2-8 steps, the steps that
carry most of a wave taking 28-52 ms for 4,000-7,300 prompt tokens, where the engine loop's one 8,192-token
step takes ~28 ms. Here one engine with serve-llm's settings (8,192 tokens a step, prefix caching on) takes
waves of 64 x (128 + 128) random tokens, each arriving in the pieces given (e.g. 64 at once; 6 then 45 then
13, T13's split), one step between pieces; each step is timed to the device's end (synchronized, so no
overlap hides it). Printed and written (wave_steps_probe.json under $OUT): per split, each step's prompt
tokens, decode rows and milliseconds, two rounds, the first discarded.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

SPLITS = {"64 at once": (64,), "6, 45, 13": (6, 45, 13), "1, 5, 45, 13": (1, 5, 45, 13), "24, 40": (24, 40)}


def _timed_step(eng: LLMEngine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def wave(eng: LLMEngine, split: tuple[int, ...], tag: str, gen: torch.Generator) -> list[dict]:
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    steps, n = [], 0
    for piece in split:
        for _ in range(piece):
            ids = tuple(torch.randint(100, 30000, (128,), generator=gen).tolist())
            eng.add_request(EngineRequest(f"{tag}-{n}", ids, params))
            n += 1
        decoding = sum(1 for r in eng.scheduler.running if r.prefilled)
        steps.append({"added": piece, "decode_rows": decoding, "ms": round(_timed_step(eng), 2)})
    while any(not r.prefilled for r in eng.scheduler.running) or eng.scheduler.waiting:
        steps.append({"added": 0, "decode_rows": -1, "ms": round(_timed_step(eng), 2)})
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    steps.append({"rest_ms": round((time.perf_counter() - t0) * 1e3, 1)})
    return steps


def main() -> None:
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    config = EngineConfig(device="cuda", max_num_seqs=64, kv_cache_tokens=64 * 640, max_model_len=1024,
                          max_num_batched_tokens=8192)  # fmt: skip
    eng = LLMEngine(folder, config)
    gen = torch.Generator().manual_seed(0)
    out: dict = {}
    for rnd in range(2):
        for name, split in SPLITS.items():
            res = wave(eng, split, f"{rnd}-{name}", gen)
            if rnd:
                out[name] = res
                print(name, res, flush=True)
    write_json("wave_steps_probe.json", out)


if __name__ == "__main__":
    main()
