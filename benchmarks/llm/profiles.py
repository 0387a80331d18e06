"""CUPTI timelines through torch.profiler: the load test's prefill and decode steps, and a decode graph's
kernels (what each adds to the step).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import cuda_time, free
from engine_bench import RESULTS, bench_engine, row

from inferforge.llm.engine import LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def _timeline_gaps(spans: list[tuple[float, float]], start: float, end: float) -> dict[str, float]:
    """Where the device idled during a host-timed range (us timestamps of one clock): before its first
    kernel, between kernels, after its last."""
    idle, reach = 0.0, spans[0][1]
    for a, b in spans[1:]:
        idle += max(0.0, a - reach)
        reach = max(reach, b)
    return {"lead_ms": (spans[0][0] - start) / 1e3, "idle_ms": idle / 1e3, "tail_ms": (end - reach) / 1e3}


def _profile_steps(eng: LLMEngine, steps: int) -> dict:
    """Run `steps` engine steps under CUPTI: wall time, device busy time (kernels and copies), where the
    device idled (before the first kernel, between kernels, after the last) and the busiest kernels."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        with torch.profiler.record_function("bench.steps"):
            for _ in range(steps):
                eng.step()
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels: dict[str, float] = {}
    spans = []
    for e in prof.events():
        if e.device_type.name == "CUDA" and e.name != "bench.steps":
            kernels[e.name[:50]] = kernels.get(e.name[:50], 0.0) + (e.time_range.end - e.time_range.start)
            spans.append((e.time_range.start, e.time_range.end))
    host = next(e for e in prof.events() if e.name == "bench.steps" and e.device_type.name == "CPU")
    gaps = _timeline_gaps(sorted(spans), host.time_range.start, host.time_range.end)
    top = dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:12])
    return {"wall_ms": wall * 1e3, "busy_ms": sum(kernels.values()) / 1e3, "top_us": top, **gaps}


def prefill_profile(folder: Path) -> None:
    """The load test's first step (64 prompts of 128 tokens in one 8,192-token step) and then 32 of its
    decode steps: wall time against the device's busy time, where the device idled, the busiest kernels."""
    eng = bench_engine(folder, None, max_num_batched_tokens=8192, decode_buckets=(64,))
    g = torch.Generator().manual_seed(0)
    for rep in range(3):
        params = SamplingParams(max_tokens=2 if rep < 2 else 40, temperature=0.0, ignore_eos=True)
        for i in range(64):
            ids = tuple(torch.randint(100, 500, (128,), generator=g).tolist())
            eng.add_request(EngineRequest(f"pp{rep}-{i}", ids, params))
        if rep < 2:  # warm-up
            while eng.has_unfinished():
                eng.step()
            continue
        for name, steps in (("prefill", 1), ("decode", 2), ("decode", 32)):
            res = _profile_steps(eng, steps)
            if steps == 2:
                continue  # the steps that finish the overlap with the prefill step
            RESULTS[f"profile_{name}"] = res
            row(f"{name}: {steps} step(s) 64 x 128-token prompts: wall / device busy (ms)",
                f"{res['wall_ms']:.1f} / {res['busy_ms']:.1f}")  # fmt: skip
            row("  device idle before the first kernel / between kernels / after the last (ms)",
                f"{res['lead_ms']:.2f} / {res['idle_ms']:.2f} / {res['tail_ms']:.2f}")  # fmt: skip
            for kname, us in list(res["top_us"].items())[:8]:
                row(f"  {kname}", f"{us / 1e3:.2f} ms")
    while eng.has_unfinished():
        eng.step()
    del eng
    free()


def graph_profile(folder: Path, batch: int = 1, quant: str | None = None) -> None:
    """Kernel timeline of a decode graph (CUPTI through torch.profiler): per kernel, its time on
    the device and the time it adds to the step (its end minus the previous kernel's end)."""
    from torch.profiler import ProfilerActivity, profile

    eng = bench_engine(folder, quant, decode_buckets=(batch,))
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        eng.add_request(EngineRequest(f"p{i}", tuple(range(100 + i, 116 + i)), params))
    for _ in range(200):
        eng.step()
    graph = eng.runner.graphs[batch][0]
    replay_us = cuda_time(graph.replay, iters=50) * 1e6  # the same engine's replay, outside the profiler
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
        torch.cuda.synchronize()
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type.name == "CUDA" and e.time_range.end > e.time_range.start
    )
    per_step = len(kernels) // 3
    step = kernels[per_step : 2 * per_step]
    summary: dict = {}
    prev_end = step[0][0]
    for start, end, name in step:
        key = name[:60]
        d = summary.setdefault(key, {"count": 0, "busy_us": 0.0, "adds_us": 0.0})
        d["count"] += 1
        d["busy_us"] += end - start
        d["adds_us"] += end - max(prev_end, start) if end > prev_end else 0.0
        prev_end = max(prev_end, end)
    timeline = [(a, b, n[:40]) for a, b, n in step]
    span = step[-1][1] - step[0][0]
    key = f"graph_profile_b{batch}{quant or ''}"
    RESULTS[key] = {"kernels_per_step": per_step, "step_us": span, "by_kernel": summary, "timeline": timeline}
    RESULTS[key]["replay_us"] = replay_us
    if batch == 1 and per_step > 2:
        RESULTS[key]["by_place"] = places = adds_by_place(timeline)
        row("  us added by place in the layer", str(places))
    row(
        f"batch-{batch} {quant or 'bf16'} graph: kernels per step, span, replay (us)",
        f"{per_step}, {span:.0f}, {replay_us:.0f}",
    )
    for key, d in sorted(summary.items(), key=lambda kv: -kv[1]["adds_us"])[:12]:
        row(f"  {key[:50]}", f"n={d['count']} busy {d['busy_us']:.0f} us, adds {d['adds_us']:.0f} us")
    del eng
    free()


def int4_ring_overlap_profile(folder: Path) -> None:
    """Kernel timelines of the int4 batch-1 graph with gate/up, the LM head and down on their rings (as run)
    and with their whole K range in shared memory (M4-M6's tiles), in turn: if the rings help by letting the
    next kernel's programs become resident under PDL, a kernel's busy time overlaps its neighbours more
    (busy minus adds grows) with them."""
    from inferforge.llm import cuda_int4

    saved = dict(cuda_int4.TUNED)
    whole = {(16384, 2048): (4, 8), (128256, 2048): (4, 8), (2048, 8192): (1, 16)}
    for name, change in (("rings", {}), ("whole", whole), ("rings again", {})):
        cuda_int4.TUNED.update(saved)
        cuda_int4.TUNED.update(change)
        print(f"-- int4 graph profile, tiles: {name}", flush=True)
        graph_profile(folder, 1, "int4")
        RESULTS[f"int4_overlap_{name}"] = RESULTS.pop("graph_profile_b1int4")
    cuda_int4.TUNED.update(saved)


def adds_by_place(timeline: list[tuple[float, float, str]], per_layer: int = 5) -> dict[str, float]:
    """Mean time each of a layer's kernels adds past the previous kernel's end, from the first GEMV on
    (q/k/v, attention, o, gate/up, down), and the LM head's."""
    first = next((i for i, (_, _, name) in enumerate(timeline) if "gemv" in name), None)
    if first is None:  # not the batch-1 GEMV chain
        return {}
    places = ("qkv", "attention", "o", "gate_up", "down")
    sums = dict.fromkeys(places, 0.0)
    prev_end = timeline[first - 1][1] if first else timeline[0][0]
    layer_kernels = timeline[first:-1]
    for i, (start, end, _) in enumerate(layer_kernels):
        sums[places[i % per_layer]] += max(0.0, end - max(prev_end, start))
        prev_end = max(prev_end, end)
    layers = len(layer_kernels) // per_layer
    out = {p: round(v / layers, 2) for p, v in sums.items()}
    out["lm_head"] = round(max(0.0, timeline[-1][1] - prev_end), 1)
    return out
