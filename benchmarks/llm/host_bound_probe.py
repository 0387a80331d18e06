"""Is the batch-1 engine loop bound by the host or by the device? Per format: the decode graph replayed
back to back (events around 100 replays, no sync between them), and the engine loop's step split into the
time the host waits on the device (`LLMEngine.device_wait_s`) and everything else.

    cd benchmarks/llm && python host_bound_probe.py [--quants bf16,int8] [--steps 300]

Prints a line per format and writes host_bound_probe.json under $OUT. A loop whose host share is close to
its period, with little time waiting, is host-bound: the device idles between steps (V7's loop_gap_probe
showed int8's graph starting ~17 us after its inputs were copied, against ~2 us in bf16).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, replays_us, write_json
from engine_bench import bench_engine

from inferforge.llm.protocol import EngineRequest, SamplingParams


def back_to_back_us(graph: torch.cuda.CUDAGraph, n: int = 100) -> float:
    for _ in range(5):
        graph.replay()
    return replays_us(graph, n)


def loop_split(eng, steps: int) -> dict:
    params = SamplingParams(max_tokens=steps + 100, temperature=0.0, ignore_eos=True)
    eng.add_request(EngineRequest("hb", tuple(range(100, 116)), params))
    for _ in range(50):
        eng.step()
    torch.cuda.synchronize()
    wait0, t0 = eng.device_wait_s, time.perf_counter()
    host = []
    for _ in range(steps):
        w, s = eng.device_wait_s, time.perf_counter()
        eng.step()
        host.append((time.perf_counter() - s) - (eng.device_wait_s - w))
    wall = time.perf_counter() - t0
    host.sort()
    return {
        "period_us": wall / steps * 1e6,
        "device_wait_us_a_step": (eng.device_wait_s - wait0) / steps * 1e6,
        "host_us_a_step_median": host[len(host) // 2] * 1e6,
        "host_us_a_step_p90": host[int(len(host) * 0.9)] * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", default="bf16,int8")
    ap.add_argument("--steps", type=int, default=300)
    a = ap.parse_args()
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    out = {}
    for q in a.quants.split(","):
        eng = bench_engine(folder, None if q == "bf16" else q, decode_buckets=(1,))
        res = {"replay_back_to_back_us": back_to_back_us(eng.runner.graphs[1][0])}
        res |= loop_split(eng, a.steps)
        out[q] = res
        print(q, {k: round(v, 1) for k, v in res.items()}, flush=True)
        del eng
        torch.cuda.empty_cache()
    write_json("host_bound_probe.json", out)


if __name__ == "__main__":
    main()
