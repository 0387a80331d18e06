"""A persistent decode-layer kernel (one launch, grid barriers) against the per-kernel chain of `gemv.gemv`.

    python benchmarks/llm/bench_persistent.py [--quick]

The GEMV part of 16 Llama-3.2-1B layers at batch 1 (q/k/v 3072x2048, o 2048x2048, gate/up 16384x2048, down
2048x8192; random weights, std 0.02; int8 by symmetric per-row quantization of the same), in bf16 and int8:

(a) the peer: 4 `gemv.gemv` calls a layer (norm prologue, residual and SiLU-pair epilogues), PDL on where
    the GPU has it, 64 kernels captured in one CUDA graph;
(b) `persistent.PersistentDecoder`: one launch, captured in one CUDA graph, per variant (tile rows, warps,
    programs per SM, where the next phase's first tile is loaded, and the same kernel launched once a phase);
(c) the barriers alone: 63 and 3 grid barriers with no work, us per barrier from the difference.

Each replay streams all 16 layers' weights (1.9 GB bf16), so L2 holds none of them. CUDA events around graph
replays: 20 warm-up, 200 replays, median of 5 groups. Each variant is checked against (a) first (max abs diff
of the final x over its max, every buffer poisoned with NaN before; three more launches must be bit-identical)
and not timed if it fails. The variants run in a child process that reports after each one; a variant
silent for 90 s (a grid barrier deadlocks if a program is not resident) is recorded as a hang, the child is
killed and a fresh one runs the rest. Prints a table; writes persistent.json under $OUT.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
if "--smoke" in sys.argv:  # Triton reads it when the kernels are defined
    os.environ["TRITON_INTERPRET"] = "1"
from common import write_json

from inferforge.llm import fused, persistent

L, H, NQ, F = 16, 2048, 3072, 8192
TOLERANCE = 2e-2  # bf16 rounding noise over 16 layers is ~1e-3 of the largest entry; a race is O(1) or NaN
HANG_S = 60.0  # silence that counts as a hang (a variant compiles, checks and times in well under this)
MAX_HANGS = 2  # then the remaining barrier variants are skipped (split ones still run)
BUDGET_S = 300.0  # no variant starts after this much wall time
# name, weights, config; 32 KB of weights per tile is bf16 8 x 2048 or int8 16 x 2048. The defaults and the
# barrier cost first (the answer), then the controls, then the rest; two programs per SM last (the riskiest).
VARIANTS: list[tuple[str, str, dict]] = [
    ("bf16 8x2048 w8", "bf16", dict(block_n=8, num_warps=8)),
    ("int8 16x2048 w8", "int8", dict(block_n=16, num_warps=8)),
    ("barriers", "bf16", dict(block_n=8, num_warps=8)),
    ("bf16 8x2048 w8 split", "bf16", dict(block_n=8, num_warps=8, split=True)),
    ("int8 16x2048 w8 split", "int8", dict(block_n=16, num_warps=8, split=True)),
    ("bf16 8x2048 w8 pf-before-arrive", "bf16", dict(block_n=8, num_warps=8, prefetch=1)),
    ("bf16 8x2048 w8 no-pf", "bf16", dict(block_n=8, num_warps=8, prefetch=2)),
    ("int8 16x2048 w8 pf-before-arrive", "int8", dict(block_n=16, num_warps=8, prefetch=1)),
    ("int8 16x2048 w8 no-pf", "int8", dict(block_n=16, num_warps=8, prefetch=2)),
    ("int8 8x2048 w8", "int8", dict(block_n=8, num_warps=8)),
    ("int8 16x2048 w16", "int8", dict(block_n=16, num_warps=16)),
    ("bf16 4x2048 w4", "bf16", dict(block_n=4, num_warps=4)),
    ("bf16 8x2048 w16", "bf16", dict(block_n=8, num_warps=16)),
    ("bf16 16x2048 w8", "bf16", dict(block_n=16, num_warps=8)),
    ("bf16 4x2048 w8 2/SM", "bf16", dict(block_n=4, num_warps=8, programs_per_sm=2)),
    ("int8 8x2048 w4 2/SM", "int8", dict(block_n=8, num_warps=4, programs_per_sm=2)),
    ("int8 4x2048 w8 2/SM", "int8", dict(block_n=4, num_warps=8, programs_per_sm=2)),
    ("barriers 2/SM", "bf16", dict(block_n=4, num_warps=8, programs_per_sm=2)),
]
QUICK = {"bf16 8x2048 w8", "bf16 4x2048 w8 2/SM", "int8 16x2048 w8", "int8 8x2048 w8", "barriers"}
DEV, ACT = "cuda", torch.bfloat16


def smoke_setup() -> None:
    """--smoke: the script's own plumbing on a CPU (Triton's interpreter, tiny fp32 layers, one program; the
    two-program variant deadlocks there by design, to exercise the hang guard)."""
    global L, H, NQ, F, HANG_S, VARIANTS, DEV, ACT
    L, H, NQ, F, HANG_S, DEV, ACT = 2, 64, 96, 128, 20.0, "cpu", torch.float32
    VARIANTS = [("bf16 8 nprog1", "bf16", dict(block_n=8, nprog=1)),
                ("int8 4 nprog1 no-pf", "int8", dict(block_n=4, nprog=1, prefetch=2)),
                ("bf16 8 nprog2 (deadlocks here)", "bf16", dict(block_n=8, nprog=2)),
                ("bf16 8 nprog5 split", "bf16", dict(block_n=8, nprog=5, split=True)),
                ("barriers", "bf16", dict(block_n=8, nprog=1))]  # fmt: skip


def make_stack(weights: str) -> persistent.LayerStack:
    """The same random layers in every process (the CUDA generator, seeded)."""
    g = torch.Generator(device=DEV).manual_seed(0)

    def rnd(*shape: int, std: float) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=DEV) * std).to(ACT)

    mats = [rnd(L, n, k, std=0.02) for n, k in ((NQ, H), (H, H), (2 * F, H), (H, F))]
    stack = persistent.LayerStack(*mats, 1 + rnd(L, H, std=0.1), 1 + rnd(L, H, std=0.1), eps=1e-5)
    return persistent.quantize(stack) if weights == "int8" else stack


def graph_us(fn, warmup: int = 20, reps: int = 200, groups: int = 5) -> tuple[float, list[float]]:
    """us per replay of `fn` captured in one graph: median of `groups` groups of `reps` replays."""
    fn()
    if DEV == "cpu":
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6, []
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(groups):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(reps):
            graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / reps)
    del graph
    return sorted(times)[len(times) // 2], times


def x_input() -> torch.Tensor:
    return torch.randn(1, H, generator=torch.Generator().manual_seed(1)).to(DEV, ACT)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def run_variant(name: str, weights: str, cfg: dict, stacks: dict, reps: int) -> dict:
    """In the child: build, check against the chain, time."""
    stack = stacks[weights]
    dec = persistent.PersistentDecoder(stack, persistent.PersistentConfig(**cfg))
    res: dict = dict(name=name, weights=weights, config=cfg, nprog=dec.nprog, resident=dec.resident)
    if name.startswith("barriers"):
        for layers in (L, 1):
            us, _ = graph_us(lambda n=layers: dec.barriers_only(n), reps=reps)
            res[f"us_{4 * layers - 1}_barriers"] = us
        res["us_per_barrier"] = (res[f"us_{4 * L - 1}_barriers"] - res["us_3_barriers"]) / (4 * L - 4)
        res["status"] = "ok"
        return res
    x = x_input()
    want = persistent.chain(x, stack)
    out = torch.full_like(x, float("nan"))
    dec.t.fill_(float("nan"))
    dec.u.fill_(float("nan"))
    got = dec(x, out).clone()
    res["rel_err_vs_chain"] = rel(got, want)
    res["deterministic"] = all(torch.equal(dec(x, out), got) for _ in range(3))
    res["counters_zero"] = dec.counters.tolist() == [0, 0]
    if not (res["rel_err_vs_chain"] < TOLERANCE and res["deterministic"] and res["counters_zero"]):
        res["status"] = "wrong"
        return res
    us, groups = graph_us(lambda: dec(x, out), reps=reps)
    res.update(status="ok", us=us, groups_us=groups, us_per_layer=us / L)
    res["tb_s"] = stack.weight_bytes() / us / 1e6
    return res


def child(names: list[str], reps: int, deadline: float) -> None:
    """Runs the named variants in order, one JSON line each (a line before each, so a hang is attributed)."""
    fused.enable_pdl(DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9)
    stacks = {w: make_stack(w) for w in ("bf16", "int8")}
    for name, weights, cfg in VARIANTS:
        if name not in names:
            continue
        if time.time() > deadline:
            print("RESULT " + json.dumps({"name": name, "status": "not run (time budget)"}), flush=True)
            continue
        print("START " + name, flush=True)
        try:
            res = run_variant(name, weights, cfg, stacks, reps)
        except Exception as e:  # a refused or failed variant is a result; a fresh process runs the rest
            res = {"name": name, "status": "error", "error": f"{type(e).__name__}: {e}"[:500]}
            print("RESULT " + json.dumps(res), flush=True)
            sys.exit(3)
        print("RESULT " + json.dumps(res), flush=True)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def run_children(names: list[str], reps: int) -> list[dict]:
    """The variants in child processes; a child silent for HANG_S is killed and its variant recorded as a
    hang; a child that exits after an error is replaced by a fresh one for the rest."""
    results: list[dict] = []
    todo, hangs, deadline = list(names), 0, time.time() + BUDGET_S
    while todo:
        cmd = [sys.executable, __file__, "--child", json.dumps(todo), "--reps", str(reps)]
        cmd += ["--deadline", str(deadline)] + (["--smoke"] if DEV == "cpu" else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        current, done_here = None, 0
        while True:
            try:
                line = lines.get(timeout=HANG_S)
            except queue.Empty:
                proc.kill()
                proc.wait()
                name, hangs = current or todo[0], hangs + 1
                results.append({"name": name, "status": f"hang (> {HANG_S:.0f} s)"})
                print(f"  {name}: no answer in {HANG_S:.0f} s, killed", flush=True)
                todo.remove(name)
                if hangs >= MAX_HANGS or time.time() > deadline:
                    why = f"skipped ({hangs} hangs)" if hangs >= MAX_HANGS else "not run (time budget)"
                    barrier = [n for n in todo if time.time() > deadline or "split" not in n]
                    results += [{"name": n, "status": why} for n in barrier]
                    todo = [n for n in todo if n not in barrier]
                break
            if line is None:
                proc.wait()
                if current is not None:  # died inside a variant
                    results.append({"name": current, "status": f"child exit {proc.returncode}"})
                    todo.remove(current)
                elif proc.returncode == 0 or done_here == 0:  # finished, or fails before any variant
                    left = f"not run (child exit {proc.returncode})"
                    results += [{"name": n, "status": left} for n in todo]
                    todo = []
                break
            if line.startswith("START "):
                current = line[6:].strip()
            elif line.startswith("RESULT "):
                res = json.loads(line[7:])
                results.append(res)
                todo.remove(res["name"])
                current, done_here = None, done_here + 1
                print("  " + summary(res), flush=True)
    return results


def summary(res: dict) -> str:
    if "us_per_barrier" in res:
        return f"{res['name']:34s} nprog {res['nprog']:3d}  {res['us_per_barrier']:.2f} us per barrier"
    if res.get("status") != "ok":
        err = res.get("rel_err_vs_chain")
        return f"{res['name']:34s} {res.get('status')} {res.get('error', '')} rel err {err}"
    return (f"{res['name']:34s} nprog {res['nprog']:3d} res/SM {res['resident']}  {res['us']:8.1f} us  "
            f"{res['us_per_layer']:6.2f} us/layer  {res['tb_s']:.2f} TB/s  "
            f"err {res['rel_err_vs_chain']:.1e}")  # fmt: skip


def peers(reps: int) -> dict:
    """(a): the gemv chain in one graph, per weight format, and its own check against eager torch."""
    pdl = DEV == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    fused.enable_pdl(pdl)
    out: dict = {"pdl": pdl}
    for weights in ("bf16", "int8"):
        stack = make_stack(weights)
        x = x_input()
        err = rel(persistent.chain(x, stack), persistent.reference(x, stack))
        us, groups = graph_us(lambda s=stack, x=x: persistent.chain(x, s), reps=reps)
        nbytes = stack.weight_bytes()
        out[weights] = dict(us=us, groups_us=groups, us_per_layer=us / L, tb_s=nbytes / us / 1e6,
                            rel_err_vs_eager=err, weight_bytes=nbytes)  # fmt: skip
        print(f"  peer {weights}: gemv chain {us:8.1f} us  {us / L:6.2f} us/layer  "
              f"{out[weights]['tb_s']:.2f} TB/s  (vs eager torch {err:.1e})", flush=True)  # fmt: skip
        del stack
        if DEV == "cuda":
            torch.cuda.empty_cache()
    fused.enable_pdl(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--deadline", type=float, default=float("inf"))
    ap.add_argument("--smoke", action="store_true", help="the plumbing on a CPU, nothing measured")
    args = ap.parse_args()
    if args.smoke:
        smoke_setup()
    if args.child is not None:
        child(json.loads(args.child), args.reps, args.deadline)
        return
    reps = 50 if args.quick else args.reps
    t0 = time.time()
    name, sms = "cpu (smoke)", 0
    if DEV == "cuda":
        props = torch.cuda.get_device_properties(0)
        name, sms = props.name, props.multi_processor_count
    print(f"{name}, {sms} SMs, torch {torch.__version__}", flush=True)
    peer = peers(reps)
    names = [n for n, _, _ in VARIANTS if not args.quick or n in QUICK]
    results = run_children(names, reps)
    for res in results:
        if res.get("status") == "ok" and "us" in res:
            res["peer_over_persistent"] = peer[res["weights"]]["us"] / res["us"]
    print(f"\n{'variant':34s} {'us/step':>9s} {'us/layer':>9s} {'TB/s':>6s} {'chain/this':>10s}")
    for w in ("bf16", "int8"):
        p = peer[w]
        label = "gemv chain (peer) " + w
        print(f"{label:34s} {p['us']:9.1f} {p['us_per_layer']:9.2f} {p['tb_s']:6.2f} {1:10.2f}")
    for res in results:
        if "peer_over_persistent" in res:
            print(f"{res['name']:34s} {res['us']:9.1f} {res['us_per_layer']:9.2f} {res['tb_s']:6.2f} "
                  f"{res['peer_over_persistent']:10.2f}")  # fmt: skip
        else:
            print(summary(res))
    write_json("persistent.json", {
        "device": name, "sms": sms, "torch": torch.__version__,
        "shape": dict(layers=L, hidden=H, qkv=NQ, ffn=F), "reps": reps, "tolerance": TOLERANCE,
        "peer": peer, "variants": results, "wall_s": time.time() - t0,
        "command": "python benchmarks/llm/bench_persistent.py" + (" --quick" if args.quick else ""),
    })  # fmt: skip
    print(f"wall {time.time() - t0:.0f} s; JSON in $OUT/persistent.json", flush=True)


if __name__ == "__main__":
    main()
