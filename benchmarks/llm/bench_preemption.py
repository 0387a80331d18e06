"""KV blocks as sequences grow, against whole-budget reservations, on the GPU (1.2B Llama shape, random
bf16 weights; the engine's own `load_test`, 64 requests of 128 prompt + 128 generated tokens arriving
together, 8,192 tokens a step as serve-llm runs).

    python benchmarks/llm/bench_preemption.py [--rounds 2]

1. A cache that holds every whole budget (the benchmark's 64 x 640 tokens): `reserve_full_budget` on and off
   in turn. Nothing is preempted either way; what differs is the block tables growing a block at a time
   (rows rewritten as they grow) and the scheduler's per-step check. The cost of the new default.
2. A cache of 64 x 160 tokens (640 blocks; a whole budget is 16 blocks, so 40 requests fit reserved): with
   reservations 40 run, then 24; growing blocks admits all 64 with 9 blocks each and preempts (and
   recomputes) the newest when they run out. What preemption buys, or costs, when memory is short.

Writes `preemption.json` under $OUT.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json
from engine_bench import RESULTS, load_test, row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    caches = {"ample": 64 * 640, "short": 64 * 160}
    for r in range(a.rounds):
        for cache, tokens in caches.items():
            for reserve in (True, False):
                name = f"{cache} cache, {'reserve' if reserve else 'grow'}, round {r}"
                row(f"-- {name}", "")
                res = load_test(folder, None, 8192, kv_cache_tokens=tokens, reserve_full_budget=reserve)
                RESULTS[name] = res
                counts = f"{res['preemptions']} / {res['recomputed_tokens']}"
                row("   preemptions / recomputed tokens (both waves of the load test)", counts)
                write_json("preemption.json", RESULTS)


if __name__ == "__main__":
    main()
