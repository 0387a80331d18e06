"""Where the batch-1 engine loop spends the time between its CUDA-graph replays.

    cd benchmarks/llm && python loop_gap_probe.py [--quant int8] [--steps 40]

The bf16 loop makes ~1,031 tok/s (970 us a token) where the graph alone replays in ~946 us: ~24 us a step
go to what runs outside the graph (the inputs' host-to-device copy, the carried token, the sampler, the
token's copy back) and to the gaps between them. One greedy batch-1 request decodes; `torch.profiler`
records every kernel and copy of `--steps` steps; a step is cut at each graph's first kernel (the
embedding). Printed and written (loop_gap_probe.json under $OUT): the mean step period, the graph's span,
each outside operation's mean time, and the device's idle time between consecutive operations, by the pair.
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
    first = events[0][2]  # the embedding: each graph's first kernel
    starts = [i for i, e in enumerate(events) if e[2] == first]
    periods, spans, outside, gaps = [], [], {}, {}
    for a, b in itertools.pairwise(starts[1:]):  # the first step may hold the profiler's start
        step = events[a:b]
        graph = step[:GRAPH_KERNELS]  # the 1.2B batch-1 chain: embedding, 16 x 5 kernels, the LM head
        periods.append(events[b][0] - events[a][0])
        spans.append(graph[-1][1] - graph[0][0])
        for e in step[GRAPH_KERNELS:]:
            outside.setdefault(e[2][:50], []).append(e[1] - e[0])
        tail = [graph[-1], *step[GRAPH_KERNELS:], events[b]]
        for x, y in itertools.pairwise(tail):
            gaps.setdefault(f"{x[2][:30]} -> {y[2][:30]}", []).append(max(0.0, y[0] - x[1]))
    res = {
        "quant": quant or "bf16",
        "steps_profiled": len(periods),
        "operations_a_step": round(statistics.mean(b - a for a, b in itertools.pairwise(starts))),
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
    a = ap.parse_args()
    write_json("loop_gap_probe.json", probe(a.quant, a.steps))


if __name__ == "__main__":
    main()
