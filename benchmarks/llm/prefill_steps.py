"""Prompt steps with and without their CUDA graphs (`prefill_graphs.py`), side by side in one process.

For each engine (prompt-step graphs on; off; with buckets up to 4,096 tokens; on again; same weights, same
settings otherwise) on the 1.2B Llama shape, bf16:
- TTFT of one prompt of 128 to 4,000 tokens on an idle engine (add to first token, wall clock), median of 10;
- `k` 128-token prompts arriving into 64 - k streams that decode: wall time from the arrival to the new
  prompts' first tokens, and the longest gap between two tokens of the running streams around it, median of
  10 arrivals;
- the steady decode step at batch 64 (mean over 100 steps), the floor the arrivals are compared with.
Checks first that both engines give the same logprobs after the same history (greedy choices part where two
tokens are nearly tied, as they are everywhere in a random-weight model), against the gap between two eager
runs whose prompts arrive differently. Run on the GPU:
    python benchmarks/llm/prefill_steps.py            # writes $OUT/prefill_steps.json
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

GEN = torch.Generator().manual_seed(0)


def ids(n: int) -> tuple[int, ...]:
    return tuple(torch.randint(100, 5000, (n,), generator=GEN).tolist())


def ttft(eng: LLMEngine, n: int, reps: int = 20) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for r in range(reps + 2):
        t0 = time.perf_counter()
        eng.add_request(EngineRequest(f"t{n}-{r}", ids(n), params))
        while not any(o.new_token_ids for o in eng.step()):
            pass
        while eng.has_unfinished():
            eng.step()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[2:])


def arrivals(eng: LLMEngine, k: int, reps: int = 10) -> dict[str, float]:
    """64 - k streams decoding; k prompts arrive; time to their first tokens and the streams' longest gap."""
    long = SamplingParams(max_tokens=100_000, temperature=0.0, ignore_eos=True)
    for i in range(64 - k):
        eng.add_request(EngineRequest(f"s{k}-{i}", ids(128), long))
    for _ in range(20):
        eng.step()
    firsts, gaps, steps = [], [], []
    short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for r in range(reps + 2):
        new = {f"a{k}-{r}-{j}" for j in range(k)}
        for rid in new:
            eng.add_request(EngineRequest(rid, ids(128), short))
        t0 = last = time.perf_counter()
        gap, n_steps, seen = 0.0, 0, set()
        while seen != new:
            outs = eng.step()
            now = time.perf_counter()
            n_steps += 1
            if any(o.request_id.startswith("s") for o in outs):
                gap, last = max(gap, now - last), now
            seen |= {o.request_id for o in outs if o.request_id in new and o.new_token_ids}
        firsts.append((time.perf_counter() - t0) * 1e3)
        gaps.append(gap * 1e3)
        steps.append(n_steps)
        for _ in range(5):
            eng.step()
    t0 = time.perf_counter()
    for _ in range(100):
        eng.step()
    decode_ms = (time.perf_counter() - t0) * 10
    for i in range(64 - k):
        eng.abort(f"s{k}-{i}")
    while eng.has_unfinished():
        eng.step()
    return {"first_token_ms": statistics.median(firsts[2:]), "stream_gap_ms": statistics.median(gaps[2:]),
            "steps": statistics.median(steps[2:]), "decode_step_ms": decode_ms}  # fmt: skip


def logprobs_of(eng: LLMEngine, every: int) -> dict[str, list]:
    """Greedy outputs' logprobs (top 5) of 12 prompts of 40-447 tokens arriving one per `every` steps."""
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=5)
    prompts = [torch.randint(100, 5000, (40 + 37 * i,), generator=g).tolist() for i in range(12)]
    reqs = [EngineRequest(f"c{i}", tuple(p), params) for i, p in enumerate(prompts)]
    out: dict[str, list] = {r.request_id: [] for r in reqs}
    pending, steps = list(reqs), 0
    while pending or eng.has_unfinished():
        if pending and (every == 0 or steps % every == 0):
            eng.add_request(pending.pop(0))
            if every == 0:
                continue
        for o in eng.step():
            out[o.request_id] += o.logprobs or []
        steps += 1
    return out


def conditional_gap(a: dict[str, list], b: dict[str, list]) -> dict[str, float]:
    """Largest logprob difference (chosen token and top 5) after the same history, positions compared, and
    the share of first tokens chosen alike (see tests/llm/test_gpu.py `conditional_logprob_gap`)."""
    worst, n, first = 0.0, 0, 0
    for rid, xs in a.items():
        first += xs[0].token_id == b[rid][0].token_id
        for x, y in zip(xs, b[rid], strict=True):
            alts = dict(y.top)
            worst = max(
                [worst, abs(x.logprob - y.logprob), *(abs(lp - alts[t]) for t, lp in x.top if t in alts)]
            )
            n += 1
            if x.token_id != y.token_id:
                break
    return {"max_logprob_gap": worst, "positions": n, "first_token_agreement": first / len(a)}


def main() -> None:
    folder = make_random_1b(Path("/tmp/inferforge_llama1b"))
    # prefix caching off: the logprob check runs the same prompts twice through one engine
    common = dict(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_tokens=131072,
                  enable_prefix_caching=False)  # fmt: skip
    on = LLMEngine(folder, EngineConfig(**common))
    off = LLMEngine(folder, EngineConfig(**common, prefill_graph_tokens=()))
    big_buckets = (*EngineConfig().prefill_graph_tokens, 3072, 4096)
    big = LLMEngine(folder, EngineConfig(**common, prefill_graph_tokens=big_buckets))
    res: dict = {"device": torch.cuda.get_device_name(0),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "graphs": sorted(on.runner.prefill_graphs.graphs) if on.runner.prefill_graphs else None,
                 "big_error": big.runner.prefill_graph_error,
                 "graph_error": on.runner.prefill_graph_error}  # fmt: skip
    print(res, flush=True)
    staggered_on, staggered_off = logprobs_of(on, 1), logprobs_of(off, 1)
    res["check"] = {
        "graphs_vs_eager": conditional_gap(staggered_on, staggered_off),
        "eager_staggered_vs_eager_together": conditional_gap(staggered_off, logprobs_of(off, 0)),
    }
    print(res["check"], flush=True)
    names = ("graphs", "eager", "graphs_to_4096", "graphs_again")
    lengths = (128, 512, 1024, 2048, 3072, 4000)
    for name, eng in zip(names, (on, off, big, on), strict=True):
        row: dict = {f"ttft_{n}_ms": ttft(eng, n, reps=10) for n in lengths}
        for k in (1, 6, 16, 30):
            row[f"arrive_{k}"] = arrivals(eng, k)
        res[name] = row
        print(name, row, flush=True)
    print(f"{'':26s}" + "".join(f"{n:>15s}" for n in names))
    for n in lengths:
        print(f"ttft {n:5d} ms{'':14s}" + "".join(f"{res[x][f'ttft_{n}_ms']:15.2f}" for x in names))
    for k in (1, 6, 16, 30):
        for m in ("first_token_ms", "stream_gap_ms", "decode_step_ms"):
            print(f"{k:2d} in: {m:18s}" + "".join(f"{res[x][f'arrive_{k}'][m]:15.2f}" for x in names))
    write_json("prefill_steps.json", res)


if __name__ == "__main__":
    main()
