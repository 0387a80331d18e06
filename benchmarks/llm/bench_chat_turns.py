"""The second turn of a chat on the GPU: its prompt repeats the first turn's prompt and answer, so with
generated blocks in the prefix cache (`scheduler.CACHE_GENERATED`, on since 2026-11-24) it computes only its
new tokens; with prompt blocks only (the behaviour before) it computes the answer again; with caching off,
everything. 1.2B Llama shape, random bf16 weights, serve-llm's engine settings (8,192 tokens a step).

    python benchmarks/llm/bench_chat_turns.py [--rounds 2] [--conversations 32]

Per setting (each its own engine, the three in turn, `--rounds` times): turn 1 of every conversation at once
(a 480-token prompt, 128 tokens generated), then turn 2 one conversation at a time on the idle engine (its
first turn's prompt, the answer and 32 new tokens; time to first token, median), then turn 2 of every
conversation at once (time until each has its first token). Writes `chat_turns.json` under $OUT.
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
from engine_bench import RESULTS, bench_engine, row

from inferforge.llm import scheduler
from inferforge.llm.protocol import EngineRequest, SamplingParams

SETTINGS = {
    "generated blocks cached": (True, True),
    "prompt blocks only": (True, False),
    "off": (False, False),
}


def _first_tokens(eng, reqs: list[EngineRequest]) -> float:  # type: ignore[no-untyped-def]
    """Seconds until every request has its first token (then the rest is run out, untimed)."""
    for r in reqs:
        eng.add_request(r)
    t0, seen, took = time.perf_counter(), set(), 0.0
    while eng.has_unfinished():
        seen.update(o.request_id for o in eng.step())
        if not took and len(seen) == len(reqs):
            took = time.perf_counter() - t0
    return took


def run(folder: Path, caching: bool, generated: bool, conversations: int, seed: int) -> dict:
    scheduler.CACHE_GENERATED["on"] = generated
    eng = bench_engine(folder, None, enable_prefix_caching=caching, max_num_batched_tokens=8192,
                       max_model_len=2048, kv_cache_tokens=64 * 2048)  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    answer = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    firsts = [tuple(torch.randint(100, 500, (480,), generator=g).tolist()) for _ in range(conversations)]
    res = eng.generate([EngineRequest(f"a{i}", p, answer) for i, p in enumerate(firsts)])
    answers = [[t for o in res[f"a{i}"][0] for t in o.new_token_ids] for i in range(conversations)]
    news = [tuple(torch.randint(100, 500, (32,), generator=g).tolist()) for _ in range(conversations)]
    turn2 = [(*p, *a, *n) for p, a, n in zip(firsts, answers, news, strict=True)]
    one = SamplingParams(max_tokens=1)
    cached0 = eng.stats().prefix_cached_tokens_total
    alone = [_first_tokens(eng, [EngineRequest(f"b{i}", t, one)]) for i, t in enumerate(turn2)]
    cached = eng.stats().prefix_cached_tokens_total - cached0
    # the same second turns again, all at once, after a turn 1 that put them back in the cache
    eng.generate([EngineRequest(f"c{i}", p, answer) for i, p in enumerate(firsts)])
    burst = _first_tokens(eng, [EngineRequest(f"d{i}", t, one) for i, t in enumerate(turn2)])
    out = {
        "ttft_ms_median": statistics.median(alone) * 1e3,
        "ttft_ms_p90": sorted(alone)[int(0.9 * len(alone))] * 1e3,
        "cached_tokens_per_turn2": cached / conversations,
        "burst_first_tokens_ms": burst * 1e3,
    }
    del eng
    free()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--conversations", type=int, default=32)
    a = ap.parse_args()
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    for r in range(a.rounds):
        for name, (caching, generated) in SETTINGS.items():
            res = run(folder, caching, generated, a.conversations, seed=r)
            RESULTS[f"{name}, round {r}"] = res
            row(
                f"turn 2 ({name}, round {r})",
                f"TTFT median {res['ttft_ms_median']:.2f} ms, p90 {res['ttft_ms_p90']:.2f}; "
                f"{res['cached_tokens_per_turn2']:.0f} tokens cached a prompt; {a.conversations} at once: "
                f"first tokens after {res['burst_first_tokens_ms']:.1f} ms",
            )
            write_json("chat_turns.json", RESULTS)
    scheduler.CACHE_GENERATED["on"] = True


if __name__ == "__main__":
    main()
