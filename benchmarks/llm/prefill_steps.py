"""Prompt steps with and without their CUDA graphs (`prefill_graphs.py`), side by side in one process.

For each engine (prompt-step graphs on, then off; same weights, same settings otherwise) on the 1.2B Llama
shape, bf16:
- TTFT of one 512-token prompt on an idle engine (add to first token, wall clock), median of 20;
- `k` 128-token prompts arriving into 64 - k streams that decode: wall time from the arrival to the new
  prompts' first tokens, and the longest gap between two tokens of the running streams around it, median of
  10 arrivals;
- the steady decode step at batch 64 (mean over 100 steps), the floor the arrivals are compared with.
Checks first that both engines generate the same greedy tokens for a mixed workload. Run on the GPU:
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


def same_tokens(a: LLMEngine, b: LLMEngine) -> float:
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"c{i}", ids(40 + 37 * i), params) for i in range(12)]

    def run(eng: LLMEngine) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        pending = list(reqs)
        while pending or eng.has_unfinished():
            if pending:
                eng.add_request(pending.pop(0))
            for o in eng.step():
                out[o.request_id] += o.new_token_ids
        return out

    x, y = run(a), run(b)
    agree = [p == q for r in x for p, q in zip(x[r], y[r], strict=True)]
    return sum(agree) / len(agree)


def main() -> None:
    folder = make_random_1b(Path("/tmp/inferforge_llama1b"))
    common = dict(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192, kv_cache_tokens=131072)
    on = LLMEngine(folder, EngineConfig(**common))
    off = LLMEngine(folder, EngineConfig(**common, prefill_graph_tokens=()))
    res: dict = {"device": torch.cuda.get_device_name(0),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "graphs": sorted(on.runner.prefill_graphs.graphs) if on.runner.prefill_graphs else None,
                 "graph_error": on.runner.prefill_graph_error}  # fmt: skip
    print(res, flush=True)
    res["greedy_agreement"] = same_tokens(on, off)
    for name, eng in (("graphs", on), ("eager", off), ("graphs_again", on)):
        row = {"ttft_512_ms": ttft(eng, 512), "ttft_128_ms": ttft(eng, 128)}
        for k in (1, 6, 16):
            row[f"arrive_{k}"] = arrivals(eng, k)
        res[name] = row
        print(name, row, flush=True)
    print(f"greedy agreement graphs vs eager: {res['greedy_agreement']:.3f}")
    print(f"{'':24s}{'graphs':>10s}{'eager':>10s}{'graphs 2':>10s}")
    for key in ("ttft_512_ms", "ttft_128_ms"):
        print(f"{key:24s}" + "".join(f"{res[n][key]:10.2f}" for n in ("graphs", "eager", "graphs_again")))
    for k in (1, 6, 16):
        for m in ("first_token_ms", "stream_gap_ms", "decode_step_ms"):
            vals = "".join(f"{res[n][f'arrive_{k}'][m]:10.2f}" for n in ("graphs", "eager", "graphs_again"))
            print(f"{k:2d} in: {m:18s}" + vals)
    write_json("prefill_steps.json", res)


if __name__ == "__main__":
    main()
