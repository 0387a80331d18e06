"""One batch-1 decode-graph replay per weight format, for Nsight Compute: run it under `ncu` to read each
kernel alone (registers, occupancy, DRAM bytes and throughput, warp stalls), which the step's timeline
cannot show (under programmatic dependent launch a kernel's span includes the time it waits for its
predecessor).

    ncu --profile-from-start off --clock-control none --graph-profiling node \
        --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
        --csv --page details python benchmarks/llm/ncu_decode.py --quants bf16,int8 > ncu.csv

The graph replays once per format between `cudaProfilerStart` and `cudaProfilerStop`, after a warm-up, so
nothing else is profiled; `summarize` turns the CSV into a per-kernel table.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b
from engine_bench import bench_engine, decode_rate


def profile_formats(quants: list[str]) -> None:
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    for q in quants:
        eng = bench_engine(folder, None if q == "bf16" else q, decode_buckets=(1,))
        decode_rate(eng, 1, new_tokens=64)  # warm-up; leaves the graph's inputs at a real step
        graph = eng.runner.graphs[1][0]
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
        print(f"=== profiling {q}", file=sys.stderr, flush=True)
        torch.cuda.profiler.start()
        graph.replay()
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()
        del eng, graph
        free()


def summarize(text: str) -> list[dict]:
    """ncu's `--csv --page details` rows, one dict per kernel launch: name, grid, registers, the metrics."""
    lines = [ln for ln in text.splitlines() if ln.startswith('"')]
    rows = list(csv.DictReader(io.StringIO("\n".join(lines))))
    kernels: dict[str, dict] = {}
    for r in rows:
        key = r["ID"]
        k = kernels.setdefault(
            key, {"id": int(key), "name": r["Kernel Name"][:60], "grid": r.get("Grid Size")}
        )
        k[f"{r['Metric Name']} ({r['Metric Unit']})"] = r["Metric Value"]
    return sorted(kernels.values(), key=lambda k: k["id"])


def int4_tc_tiles(spec: str) -> None:
    """`--int4-tc 2048x8192=1x16,...`: send these int4 products to the tensor-core kernel with these tiles
    (`cuda_int4.TUNED`), to profile them inside the step; `NxK=none` keeps one on Triton."""
    from inferforge.llm import cuda_int4

    for item in filter(None, spec.split(",")):
        shape, tiles = item.split("=")
        n, k = (int(v) for v in shape.split("x"))
        cuda_int4.TUNED[(n, k)] = None if tiles == "none" else tuple(int(v) for v in tiles.split("x"))  # type: ignore[assignment]


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--quants", default="bf16,int8")
    ap.add_argument("--int4-tc", default="", help="NxK=MTxWARPS,... (cuda_int4.TUNED entries)")
    ap.add_argument("--summarize", help="an ncu CSV file to turn into JSON on stdout")
    args = ap.parse_args()
    if args.summarize:
        import json

        print(json.dumps(summarize(Path(args.summarize).read_text()), indent=1))
    else:
        int4_tc_tiles(args.int4_tc)
        profile_formats(args.quants.split(","))
