"""The whole int4 decode step as one persistent kernel (`inferforge.llm.int4_step`) against the engine's int4
kernel chain and its bf16 step, in one call (1.2B Llama shape, random weights, batch 1).

For each context length: the fp32 logits of one step both ways from the same cache (largest difference
relative to the largest logit, argmax, top-5 overlap), the key written at the step's slot in the last
layer, then the CUDA-graph replay time of each (median of 30 replays, the two in turn, three rounds).
bf16's graph time comes from its engine in the same call, for the ratios.

    python benchmarks/llm/bench_int4_step.py [--contexts 144,512,1000]   # JSON under $OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b, replay_us, write_json
from engine_bench import bench_engine, decode_rate, engine_numbers
from int4_step import TRACE_UNITS, Int4Step

from inferforge.llm.attention import AttnMeta


def capture(fn) -> torch.cuda.CUDAGraph:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def compare(chain: torch.Tensor, step: torch.Tensor) -> dict:
    rel = ((step - chain).abs().max() / chain.abs().max()).item()
    top_c, top_s = chain.topk(5).indices[0].tolist(), step.topk(5).indices[0].tolist()
    return {
        "rel_diff": rel,
        "argmax_equal": top_c[0] == top_s[0],
        "top5_overlap": len(set(top_c) & set(top_s)),
    }


def measure(model, step: Int4Step, decode_fn, ctx: int, table: torch.Tensor, profile: bool) -> dict:
    """One step both ways at this context (same cache, same inputs), then both graphs' replay times."""
    dev = table.device
    ids, pos = torch.tensor([1234], device=dev), torch.tensor([ctx - 1], device=dev)
    meta = AttnMeta(
        slot_mapping=pos.clone(), block_tables=table, context_lens=torch.tensor([ctx], device=dev),
        decode_fn=decode_fn,
    )  # fmt: skip
    ends = (model.blocks()[0], model.blocks()[-1])
    caches = [b.attn.k_cache.view(-1, *b.attn.k_cache.shape[2:]) for b in ends]
    with torch.inference_mode():
        chain = model.decode_logits(ids, pos, meta).float().clone()
        k_chain = [c[ctx - 1].float().clone() for c in caches]
        got = step.logits(ids, pos, meta).clone()
        torch.cuda.synchronize()
        r = compare(chain, got)
        for name, c, want in zip(("first", "last"), caches, k_chain, strict=True):
            diff = (c[ctx - 1].float() - want).abs().max() / want.abs().max()
            r[f"k_rel_diff_{name}_layer"] = diff.item()
        r["healthy"] = step.healthy()
        print(f"ctx {ctx}: {r}", flush=True)
        if not r["healthy"]:
            return r
        graphs = {
            "chain": capture(lambda: model.decode_logits(ids, pos, meta)),
            "step": capture(lambda: step.logits(ids, pos, meta)),
        }
        for rnd in range(3):
            for name, g in graphs.items():
                r[f"{name} us r{rnd}"] = us = replay_us(g, 1)
                print(f"ctx {ctx} round {rnd}: {name:5s} {us:7.1f} us/step", flush=True)
        r["healthy_after"] = step.healthy()
        if step.trace is not None:
            step.trace.zero_()
            step.logits(ids, pos, meta)
            torch.cuda.synchronize()
            r["phases"], r["units"] = phase_times(step.trace, step.phases.shape[0])
            print(f"ctx {ctx} phases (us): {r['phases']}", flush=True)
            print(f"ctx {ctx} program 0 warp 0, us between units: {r['units']}", flush=True)
        if profile:  # one launch between cudaProfilerStart and Stop, for `ncu --profile-from-start off`
            torch.cuda.profiler.start()
            step.logits(ids, pos, meta)
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
    return r


KINDS = ("qkv", "attn", "o", "gateup", "down")


def phase_times(flat: torch.Tensor, phases: int) -> tuple[dict, dict]:
    """From the kernel's globaltimer trace ([programs, phases, 2], then program 0 warp 0's unit times): per
    phase kind, the mean over layers of its span (first program in to last program out) and of the barrier
    after it (last out to first in of the next), plus the head's span and the whole launch, in us; and the
    gaps between program 0's units in layer 1 and in the LM head's first tiles."""
    sms = (flat.numel() - TRACE_UNITS) // (2 * phases)
    t = flat[: sms * phases * 2].view(sms, phases, 2).double() / 1e3
    units = flat[sms * phases * 2 :].double() / 1e3
    used = int((units > 0).sum())
    gaps = (units[1:used] - units[: used - 1]).tolist()
    per_layer = (used - 64) // ((phases - 1) // len(KINDS)) if used > 64 else 0
    unit_gaps = {"units": used, "layer 1": [round(g, 2) for g in gaps[per_layer : 2 * per_layer]],
                 "head": [round(g, 2) for g in gaps[used - 65 : used - 40]]}  # fmt: skip
    start_min, start_max = t[:, :, 0].min(0).values, t[:, :, 0].max(0).values
    end_max = t[:, :, 1].max(0).values
    phases = t.shape[1]
    out: dict = {}
    for i, kind in enumerate(KINDS):
        idx = list(range(i, phases - 1, len(KINDS)))
        out[f"{kind} span"] = round(float((end_max[idx] - start_min[idx]).mean()), 2)
        nxt = [j + 1 for j in idx]
        out[f"{kind} barrier"] = round(float((start_min[nxt] - end_max[idx]).mean()), 2)
        out[f"{kind} start skew"] = round(float((start_max[idx] - start_min[idx]).mean()), 2)
    out["head span"] = round(float(end_max[-1] - start_min[-1]), 2)
    out["total"] = round(float(end_max[-1] - start_min[0]), 2)
    return out, unit_gaps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="144,512,1000")
    ap.add_argument("--skip-bf16", action="store_true")
    ap.add_argument("--trace", action="store_true", help="also one traced launch: time per phase kind")
    ap.add_argument("--profile", action="store_true", help="one launch between cudaProfilerStart and Stop")
    args = ap.parse_args()
    folder = make_random_1b(Path("/tmp/inferforge_llama1b"))
    res: dict = {"device": torch.cuda.get_device_name()}
    eng = bench_engine(folder, "int4", decode_buckets=(1,))
    res["int4 chain decode tok/s (engine loop)"] = decode_rate(eng, 1)
    model, dev = eng.model, torch.device("cuda")
    step = Int4Step(model, trace=args.trace)
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.inference_mode():
        for b in model.blocks():  # a cache of plausible scale in the blocks the table names
            for c in (b.attn.k_cache, b.attn.v_cache):
                c[:64].copy_(torch.randn(c[:64].shape, generator=gen, device=dev).to(c.dtype))
    table = torch.arange(64, device=dev, dtype=torch.int64).view(1, 64)
    for ctx in (int(c) for c in args.contexts.split(",")):
        res[f"ctx{ctx}"] = r = measure(model, step, eng.runner.decode_fn, ctx, table, args.profile)
        if not r["healthy"]:
            break
    del step, eng, model
    free()
    if not args.skip_bf16:
        res["bf16"] = engine_numbers(folder, None, (1,))
    write_json("bench_int4_step.json", res)


if __name__ == "__main__":
    main()
