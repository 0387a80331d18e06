"""What a prompt step costs when a wave of 64 requests arrives in pieces, as through the HTTP server.

    cd benchmarks/llm && python wave_steps_probe.py

T13's engine trace (docs/llm-runs.md) saw the server's waves reach the engine in 2-8 steps, the steps that
carry most of a wave taking 28-52 ms for 4,000-7,300 prompt tokens, where the engine loop's one 8,192-token
step takes ~28 ms. Here one engine with serve-llm's settings (8,192 tokens a step, prefix caching on) takes
waves of 64 x (128 + 128) random tokens, each arriving in the pieces given (e.g. 64 at once; 6 then 45 then
13, T13's split), one step between pieces; each step is timed to the device's end (synchronized, so no
overlap hides it). Printed and written (wave_steps_probe.json under $OUT): per split, each step's prompt
tokens, decode rows and milliseconds, two rounds, the first discarded.

Each split runs with the prompt steps cut to fit a graph (`EngineConfig.align_prompt_steps`, the default
since T17) and without, in turn; and once more per setting unsynchronized, as a server runs it: the time
from the first piece to the last request's first token, and to the wave's end.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

SPLITS = {
    "64 at once": (64,),
    "6, 45, 13": (6, 45, 13),
    "1, 5, 45, 13": (1, 5, 45, 13),
    "24, 40": (24, 40),
    "1, 25, 38": (1, 25, 38),
    "4, 43, 17": (4, 43, 17),
}  # the last two: T17's server waves


def _timed_step(eng: LLMEngine) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng.step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def _add(eng: LLMEngine, piece: int, tag: str, first: int, gen: torch.Generator) -> int:
    """`piece` requests (128 random tokens, 128 to generate) numbered from `first`; returns the next."""
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    for n in range(first, first + piece):
        ids = tuple(torch.randint(100, 30000, (128,), generator=gen).tolist())
        eng.add_request(EngineRequest(f"{tag}-{n}", ids, params))
    return first + piece


def wave(eng: LLMEngine, split: tuple[int, ...], tag: str, gen: torch.Generator) -> list[dict]:
    steps, n = [], 0
    for piece in split:
        n = _add(eng, piece, tag, n, gen)
        decoding = sum(1 for r in eng.scheduler.running if r.prefilled)
        steps.append({"added": piece, "decode_rows": decoding, "ms": round(_timed_step(eng), 2)})
    while any(not r.prefilled for r in eng.scheduler.running) or eng.scheduler.waiting:
        steps.append({"added": 0, "decode_rows": -1, "ms": round(_timed_step(eng), 2)})
    t0 = time.perf_counter()
    while eng.has_unfinished():
        eng.step()
    steps.append({"rest_ms": round((time.perf_counter() - t0) * 1e3, 1)})
    return steps


def wave_unsynced(eng: LLMEngine, split: tuple[int, ...], tag: str, gen: torch.Generator) -> dict:
    """One piece a step, nothing synchronized: ms to the last request's first token and to the wave's end."""
    seen: set[str] = set()
    n, total = 0, sum(split)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    first_all = None
    pieces = list(split)
    while pieces or eng.has_unfinished():
        n = _add(eng, pieces.pop(0) if pieces else 0, tag, n, gen)
        seen.update(o.request_id for o in eng.step() if o.new_token_ids)
        if first_all is None and len(seen) == total:
            first_all = (time.perf_counter() - t0) * 1e3
    wave_ms = (time.perf_counter() - t0) * 1e3
    return {"last_first_token_ms": round(first_all or -1.0, 2), "wave_ms": round(wave_ms, 1)}


def main() -> None:
    folder = make_random_1b(Path("/tmp/inferforge_llama1b"))
    config = EngineConfig(device="cuda", max_num_seqs=64, kv_cache_tokens=64 * 640, max_model_len=1024,
                          max_num_batched_tokens=8192)  # fmt: skip
    eng = LLMEngine(folder, config)
    gen = torch.Generator().manual_seed(0)
    assert eng.runner.prefill_graphs is not None, eng.runner.prefill_graph_error
    out: dict = {}
    for rnd in range(2):
        for name, split in SPLITS.items():
            for aligned in (False, True):
                eng.config = replace(eng.config, align_prompt_steps=aligned)
                eng.fit_prompt_steps_to_graphs()
                tag = f"{rnd}-{name}-{aligned}"
                res = {"steps": wave(eng, split, tag, gen), **wave_unsynced(eng, split, tag + "u", gen)}
                if rnd:
                    out[f"{name}, {'aligned' if aligned else 'eager where no bucket'}"] = res
                    print(name, "aligned" if aligned else "unaligned", res, flush=True)
    write_json("wave_steps_probe.json", out)


if __name__ == "__main__":
    main()
