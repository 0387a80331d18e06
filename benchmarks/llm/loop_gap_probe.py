"""Where the batch-1 engine loop spends the time between its CUDA-graph replays.

    cd benchmarks/llm && python loop_gap_probe.py [--quant int8] [--steps 40]

The bf16 loop makes ~1,031 tok/s (970 us a token) where the graph alone replays in ~946 us: ~24 us a step
go to what runs outside the graph (the inputs' host-to-device copy, the carried token, the sampler, the
token's copy back) and to the gaps between them. One greedy batch-1 request decodes; `torch.profiler`
records every kernel and copy of `--steps` steps; a step runs from one token's copy back to the next (the
graph: the 82 kernels ending with the LM head). Printed and written (loop_gap_probe.json under $OUT): the
mean step period, the graph's span, each outside operation's mean time, and the device's idle time between
consecutive operations, by the pair. `--argmax torch` times the sampler's five-launch argmax (T5) instead
of the one-launch kernel (`sampler.ONE_LAUNCH_ARGMAX`).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json
from engine_bench import bench_engine

from inferforge.llm.protocol import EngineRequest, SamplingParams

GRAPH_KERNELS = 82


def _events(prof) -> list[tuple[float, float, str]]:
    out = []
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start:
            out.append((e.time_range.start, e.time_range.end, e.name))
    return sorted(out)


def probe(quant: str | None, steps: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    folder = make_random_1b(Path("/tmp/llama1b_random"))
    eng = bench_engine(folder, quant, decode_buckets=(1,))
    params = SamplingParams(max_tokens=steps + 200, temperature=0.0, ignore_eos=True)
    eng.add_request(EngineRequest("gap", tuple(range(100, 116)), params))
    for _ in range(60):
        eng.step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
    events = _events(prof)
    ends = [i for i, e in enumerate(events) if e[2].startswith("Memcpy DtoH")]  # a step's token read back
    periods, spans, outside, gaps = [], [], {}, {}
    for a, b in itertools.pairwise(ends[1:]):  # the first step may hold the profiler's start
        step = events[a + 1 : b + 1]
        last = max(i for i, e in enumerate(step) if "gemv" in e[2])  # the LM head ends the graph
        lo = last + 1 - GRAPH_KERNELS  # the 1.2B batch-1 chain: embedding, 16 x 5 kernels, the LM head
        graph, rest = step[lo : last + 1], step[:lo] + step[last + 1 :]
        periods.append(events[b][1] - events[a][1])
        spans.append(graph[-1][1] - graph[0][0])
        for e in rest:
            outside.setdefault(e[2][:50], []).append(e[1] - e[0])
        ops = [events[a], *step[:lo], graph[0], graph[-1], *step[last + 1 :]]
        for x, y in itertools.pairwise(ops):
            if x is not graph[0]:
                gaps.setdefault(f"{x[2][:30]} -> {y[2][:30]}", []).append(max(0.0, y[0] - x[1]))
    res = {
        "quant": quant or "bf16",
        "steps_profiled": len(periods),
        "operations_a_step": round(statistics.mean(b - a for a, b in itertools.pairwise(ends))),
        "period_us": statistics.median(periods),
        "graph_span_us": statistics.median(spans),
        "outside_us": {k: round(statistics.mean(v), 2) for k, v in outside.items()},
        "idle_us_by_pair": {k: (round(statistics.mean(v), 2), len(v)) for k, v in gaps.items()},
    }
    print(f"{res['quant']}: period {res['period_us']:.1f} us, graph span {res['graph_span_us']:.1f} us")
    for k, v in res["outside_us"].items():
        print(f"  outside the graph {v:7.2f} us  {k}")
    for k, v in sorted(res["idle_us_by_pair"].items(), key=lambda kv: -kv[1][0] * kv[1][1]):
        print(f"  idle {v[0]:7.2f} us x{v[1]:3d}  {k}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quant", default=None)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--argmax", choices=["one", "torch"], default="one")
    a = ap.parse_args()
    from inferforge.llm import sampler

    sampler.ONE_LAUNCH_ARGMAX["on"] = a.argmax == "one"
    res = probe(a.quant, a.steps) | {"argmax": a.argmax}
    write_json(f"loop_gap_probe-{res['quant']}-{a.argmax}.json", res)


if __name__ == "__main__":
    main()
