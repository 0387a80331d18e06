"""Where does the engine's host loop block on the device? (the server's engine process spent 4.9 s of host
time inside 3,600 prefill SDPA calls in H10's profile.)

    cd benchmarks/llm && python sync_probe.py

1. The prefill SDPA call of a 64 x 128-token step alone: host and device time per call.
2. A closed loop of 64 streams (128 prompt + 128 generated tokens) through `LLMEngine` with
   `torch.cuda.set_sync_debug_mode("warn")`: every call that synchronizes with the device, by the inferforge
   frames that led to it, with counts. Prints a table; writes sync_probe.json under $OUT.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def sdpa_alone() -> dict:
    dev, dt = torch.device("cuda"), torch.bfloat16
    q = torch.randn(64, 32, 128, 64, device=dev, dtype=dt)
    k, v = (torch.randn(64, 8, 128, 64, device=dev, dtype=dt) for _ in "kv")
    out = {}
    for gqa in (True, False):
        kk, vv = (k, v) if gqa else (k.repeat_interleave(4, 1), v.repeat_interleave(4, 1))
        for _ in range(3):
            F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20):
            F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
        b.record()
        host = (time.perf_counter() - t0) / 20
        b.synchronize()
        out[f"gqa={gqa}"] = {"host_ms": host * 1e3, "device_ms": a.elapsed_time(b) / 20}
        print(f"SDPA 64x128 causal enable_gqa={gqa}: host {host * 1e3:.3f} ms/call, device "
              f"{a.elapsed_time(b) / 20:.3f} ms/call", flush=True)  # fmt: skip
    return out


def closed_loop_syncs(folder: Path) -> dict:
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64))
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)

    def prompt() -> tuple[int, ...]:
        return tuple(torch.randint(100, 500, (128,), generator=rng).tolist())

    for i in range(64):  # warm-up
        eng.add_request(EngineRequest(f"w{i}", prompt(), SamplingParams(max_tokens=16, ignore_eos=True)))
    while eng.has_unfinished():
        eng.step()
    stacks: collections.Counter[str] = collections.Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        frames = [f for f in traceback.extract_stack()[:-1] if "inferforge" in f.filename]
        key = " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))
        stacks[f"{str(message)[:60]} @ {key}"] += 1

    warnings.showwarning = record
    warnings.simplefilter("always")
    started, done, steps, t0 = 0, 0, 0, time.perf_counter()
    for _ in range(64):
        eng.add_request(EngineRequest(f"r{started}", prompt(), params))
        started += 1
    torch.cuda.set_sync_debug_mode("warn")
    while done < 256:
        for out in eng.step():
            if out.finished:
                done += 1
                if started < 320:
                    eng.add_request(EngineRequest(f"r{started}", prompt(), params))
                    started += 1
        steps += 1
    torch.cuda.set_sync_debug_mode("default")
    wall = time.perf_counter() - t0
    print(f"closed loop: {done} requests, {steps} steps, {done * 128 / wall:,.0f} tok/s (sync debug on)")
    for key, n in stacks.most_common(15):
        print(f"{n:6d}  {key}")
    return {"steps": steps, "tok_s": done * 128 / wall, "syncs": dict(stacks.most_common(30))}


def main() -> None:
    res = {"device": torch.cuda.get_device_name(0), "sdpa": sdpa_alone()}
    res["closed_loop"] = closed_loop_syncs(make_random_1b(Path(tempfile.mkdtemp())))
    write_json("sync_probe.json", res)


if __name__ == "__main__":
    main()
