"""Decode speed of the inferforge LLM engine on the Llama-3.2-1B shape (random bf16 weights), with peers.

Run on a CUDA machine (about 6 minutes for everything; each section writes its figures as it finishes):

    python benchmarks/llm/bench_decode.py --sections check,engine,load,hf,quant,compile,attention,profile

Peers in the same run: Hugging Face `generate` (default cache, `hf`) and `generate` with a static cache under
`torch.compile(mode="reduce-overhead")` (`compile`). Prints a table; writes bench_decode.json under $OUT.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_parts
from common import Clock, cuda_time, free, make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.serve.heap import refreeze

T0 = time.perf_counter()
RESULTS: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:58s} {value}", flush=True)


def check_tiny() -> None:
    """Greedy on CUDA (fp32 and bf16) against transformers fp32 on the tiny models; the Triton kernel's
    error."""
    from transformers import AutoModelForCausalLM

    from inferforge.llm import fused, triton_attn
    from inferforge.llm.sampler import argmax_rows
    from inferforge.llm.tiny import make_tiny_llama

    x = torch.randn(4, 128256, device="cuda")
    x[1] = 0.0
    x[2, [7, 128000]] = 50.0
    x[3, [128254, 128255]] = 50.0
    row("two-pass argmax == torch.argmax on cuda (ties)", str(torch.equal(argmax_rows(x), x.argmax(-1))))
    row("fused kernels rel. error vs eager (bf16)", str(fused.check_against_reference(torch.device("cuda"))))
    row(
        "triton paged decode max abs err vs torch (bf16)",
        f"{triton_attn.check_against_reference(torch.device('cuda')):.2e}",
    )
    for fam in ("llama", "qwen2", "gpt2"):
        folder = make_tiny_llama(Path(f"/tmp/tiny_{fam}"), family=fam)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompts = [
            (5, 17, 99, 3),
            (200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 300),
        ]
        refs = [
            hf.generate(
                torch.tensor([p]), max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in prompts
        ]
        for dtype in ("float32",):
            eng = LLMEngine(
                folder, EngineConfig(device="cuda", dtype=dtype, kv_cache_tokens=4096, max_num_seqs=8)
            )
            params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
            res = eng.generate([EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
            ours = [[t for o in res[str(i)][0] for t in o.new_token_ids] for i in range(len(prompts))]
            agree = sum(
                a == b for o, r in zip(ours, refs, strict=True) for a, b in zip(o, r, strict=True)
            ) / sum(len(r) for r in refs)
            first_diff = min(
                (
                    next((j for j, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(r))
                    for o, r in zip(ours, refs, strict=True)
                )
            )
            row(
                f"tiny {fam} cuda {dtype} greedy == HF fp32 CPU",
                f"{ours == refs} (agree {agree:.3f}, first diff {first_diff})",
            )
            alone = [  # one sequence: the batch-1 graph, through `gemv` where the model allows it
                [
                    t
                    for o in eng.generate([EngineRequest(f"a{i}", p, params)])[f"a{i}"][0]
                    for t in o.new_token_ids
                ]
                for i, p in enumerate(prompts)
            ]
            gemv_on = eng.model.gemv_ops is not None
            row(f"tiny {fam} cuda {dtype} batch 1 (gemv {gemv_on}) == HF fp32 CPU", str(alone == refs))
            RESULTS[f"check_{fam}_{dtype}"] = {
                "identical": ours == refs,
                "agreement": agree,
                "kernel": eng.decode_kernel,
                "batch1_identical": alone == refs,
                "batch1_gemv": gemv_on,
            }
            del eng
            free()


def check_mixed_steps() -> None:
    """Requests joining while others decode (mixed steps: decode rows and prompt chunks in one pass, tokens
    carried on the device) must generate what each generates alone, through graphs and fused kernels."""
    from inferforge.llm.tiny import make_tiny_llama

    folder = make_tiny_llama(Path("/tmp/tiny_mixed"), family="llama")
    for dtype in ("float32", "bfloat16"):
        eng = LLMEngine(
            folder, EngineConfig(device="cuda", dtype=dtype, kv_cache_tokens=4096, max_num_seqs=8)
        )
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        reqs = [EngineRequest(f"m{i}", tuple(range(30 + 7 * i, 40 + 9 * i)), params) for i in range(5)]
        alone = {
            r.request_id: [t for o in eng.generate([r])[r.request_id][0] for t in o.new_token_ids]
            for r in reqs
        }
        got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        pending, step = list(reqs), 0
        while pending or eng.has_unfinished():
            if pending and step % 3 == 0:
                eng.add_request(pending.pop(0))
            for o in eng.step():
                got[o.request_id].extend(o.new_token_ids)
            step += 1
        row(f"tiny llama cuda {dtype}: staggered arrivals == each alone", str(got == alone))
        RESULTS[f"check_mixed_{dtype}"] = got == alone
        del eng
        free()


def decode_rate(eng: LLMEngine, batch: int, new_tokens: int = 256, prompt_len: int = 16) -> float:
    """Generated tokens/s over the decode phase (after every prompt is prefilled)."""
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        ids = torch.randint(100, 500, (prompt_len,), generator=g).tolist()
        eng.add_request(EngineRequest(f"d{batch}-{i}", tuple(ids), params))
    while not all(r.prefilled for r in eng.scheduler.running) or eng.scheduler.waiting:
        eng.step()
    t0, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += len(eng.step())
    return n / (time.perf_counter() - t0)


def bench_engine(folder: Path, quant: str | None = None, **overrides: object) -> LLMEngine:
    """The engine every speed section measures: 64 sequences, a 1,024-token context, 2,048 tokens per step;
    sections change only what they study."""
    config = {
        "device": "cuda",
        "quant": quant,
        "max_num_seqs": 64,
        "kv_cache_tokens": 64 * 640,
        "max_model_len": 1024,
        "max_num_batched_tokens": 2048,
        "experimental_quant": True,
        **overrides,
    }
    return LLMEngine(folder, EngineConfig(**config))  # type: ignore[arg-type]


def engine_numbers(
    folder: Path,
    quant: str | None,
    batches: tuple[int, ...],
    compile_decode: bool = False,
    note: str = "",
    **knobs: bool,
) -> dict:
    label = (quant or "bf16") + note + (" (compiled block)" if compile_decode else "")
    label += "".join(f" {k}={v}" for k, v in knobs.items())
    clk = Clock()
    eng = bench_engine(folder, quant, decode_buckets=batches, compile_decode=compile_decode, **knobs)
    out: dict = {
        "fused_kernels": eng.model.fused_ops is not None,
        "load_and_capture_s": clk(),
        "kernel": eng.decode_kernel,
        "compile_error": eng.runner.compile_error,
        "compiled": eng.model.compiled_block is not None,
        "gemv": eng.model.gemv_ops is not None,
        "gemv_error": eng.gemv_error,
    }
    row(
        f"engine {label} fused kernels", f"{out['fused_kernels']} (gemv {out['gemv']} {eng.gemv_error or ''})"
    )
    decode_rate(eng, 1, new_tokens=32)  # warm-up
    for b in batches:
        out[f"decode_tok_s_b{b}"] = rate = decode_rate(eng, b)
        row(f"engine {label} decode batch {b} (tokens/s)", f"{rate:,.0f}")
    for b in batches:
        if b in eng.runner.graphs:
            out[f"graph_b{b}_us"] = us = cuda_time(eng.runner.graphs[b][0].replay, iters=50) * 1e6
            row(
                f"engine {label} decode graph replay batch {b} (GPU us/step)",
                f"{us:.0f} -> {b * 1e6 / us:,.0f} tok/s",
            )
    row(f"engine {label} load + compile + capture (s)", f"{out['load_and_capture_s']:.0f}")
    del eng
    free()
    return out


def batch1_ab(folder: Path) -> None:
    """Batch-1 bf16 decode, one change at a time, twice in turn: when a kernel lets the next one launch
    (at its start or after its wait), the down product's tiles."""
    from inferforge.llm import fused, gemv

    variants = {
        "default": (True, None),
        "trigger after wait": (False, None),
        "down tiles 4x4096 w8": (True, gemv.TileConfig(4, 4096, 8)),
        "down tiles 16x1024 w4": (True, gemv.TileConfig(16, 1024, 4)),
    }
    for rep in range(2):
        for name, (early, down) in variants.items():
            fused._LAUNCH["early_trigger"] = early
            gemv.TUNED.clear()
            if down is not None:
                gemv.TUNED[(2048, 8192, 2)] = down
            RESULTS[f"b1ab {name} rep{rep}"] = engine_numbers(folder, None, (1,), note=f" [{name}]")
    fused._LAUNCH["early_trigger"] = False
    gemv.TUNED.clear()


def split_ab(folder: Path) -> None:
    """Batch-1 bf16 decode with split-KV attention off (one program per KV head) and on, twice in turn, at a
    short context (16-token prompts, as `decode_rate`) and a long one (3,000-token prompts): tokens/s of 256
    generated tokens. One engine per setting (the split count is fixed when a graph is captured)."""
    from inferforge.llm import triton_attn

    default = triton_attn.MAX_SPLITS
    for rep in range(2):
        for name, splits in (("split off", 1), ("split on", default)):
            triton_attn.MAX_SPLITS = splits
            eng = bench_engine(folder, None, decode_buckets=(1,), max_model_len=4096,
                               kv_cache_tokens=16 * 4096, max_num_batched_tokens=4096)  # fmt: skip
            decode_rate(eng, 1, new_tokens=32)  # warm-up
            short = decode_rate(eng, 1)
            long = decode_rate(eng, 1, prompt_len=3000)
            RESULTS[f"splitab {name} rep{rep}"] = {"short_tok_s": short, "long3000_tok_s": long}
            row(f"b1 bf16 [{name}] ctx 16-272 / 3000-3256 (tok/s)", f"{short:,.0f} / {long:,.0f}")
            del eng
            free()
    triton_attn.MAX_SPLITS = default


INT4_TILES = {
    "bn16": {(3072, 2048): (16, 2048, 4), (2048, 2048): (16, 1024, 4), (16384, 2048): (16, 2048, 4),
             (2048, 8192): (16, 1024, 4), (128256, 2048): (16, 2048, 4)},
    "bn32": {(3072, 2048): (32, 2048, 8), (2048, 2048): (32, 512, 4), (16384, 2048): (32, 2048, 8),
             (2048, 8192): (32, 512, 4), (128256, 2048): (32, 2048, 8)},
}  # fmt: skip


def int4_tiles_ab(folder: Path) -> None:
    """int4 batch-1 decode with `gemv_int4`'s default 8-column tiles (32 bytes of each packed row) against 16
    and 32 columns (64 and 128 bytes: whole sectors / lines of the [K/8, N] layout), twice in turn; bf16 once
    for the ratio. Tiles that compile without spills for sm_90 (read offline)."""
    from inferforge.llm import gemv, gemv_int4

    RESULTS["int4tiles bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for rep in range(2):
        for name in ("default", *INT4_TILES):
            gemv_int4.TUNED.clear()
            for key, (bn, bk, w) in INT4_TILES.get(name, {}).items():
                gemv_int4.TUNED[key] = gemv.TileConfig(bn, bk, w)
            RESULTS[f"int4tiles {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
    gemv_int4.TUNED.clear()


# int8 (1-byte) tiles tried inside the batch-1 decode step: (rows, K columns, warps) for K = 2048 shapes and
# for down (K = 8192); the default is `gemv.default_tiles` (16 x 2048 / 8 x 4096, 4 warps).
INT8_TILES = {
    "default": None,
    "8 warps": ((16, 2048, 8), (8, 4096, 8)),
    "half tiles": ((8, 2048, 4), (4, 4096, 4)),
    "double tiles 8 warps": ((32, 2048, 8), (16, 4096, 8)),
}


def int8_tiles_ab(folder: Path) -> None:
    """int8 batch-1 decode with `gemv`'s default 1-byte tiles and three others applied to every product
    (q/k/v, o, gate/up, down, LM head), twice in turn; never tried inside the step before (the bf16 sweep of
    bench_gemv.py picked the defaults)."""
    from inferforge.llm import gemv

    shapes = {(3072, 2048), (2048, 2048), (16384, 2048), (128256, 2048)}
    for rep in range(2):
        for name, tiles in INT8_TILES.items():
            gemv.TUNED.clear()
            if tiles is not None:
                (bn, bk, w), (dn, dk, dw) = tiles
                gemv.TUNED.update({(n, k, 1): gemv.TileConfig(bn, bk, w) for n, k in shapes})
                gemv.TUNED[(2048, 8192, 1)] = gemv.TileConfig(dn, dk, dw)
            RESULTS[f"int8tiles {name} rep{rep}"] = engine_numbers(folder, "int8", (1,), note=f" [{name}]")
    gemv.TUNED.clear()


# Per-shape tiles for the small products (G8's timeline: int8's o product adds 5.0 us to the step against
# bf16's 2.5, q/k/v 3.8 against 2.8: each program converts twice bf16's weights a thread after its wait).
SMALL_TILES = {
    ("int8", "qkv+o 8 rows"): {(3072, 2048, 1): (8, 2048, 4), (2048, 2048, 1): (8, 2048, 4)},
    ("int8", "qkv+o 4 rows"): {(3072, 2048, 1): (4, 2048, 4), (2048, 2048, 1): (4, 2048, 4)},
    ("int8", "qkv+o 8 rows, down 4 rows"): {(3072, 2048, 1): (8, 2048, 4), (2048, 2048, 1): (8, 2048, 4),
                                            (2048, 8192, 1): (4, 4096, 4)},
    ("int4", "qkv+o 8 warps"): {(3072, 2048): (8, 2048, 8), (2048, 2048): (8, 2048, 8)},
}  # fmt: skip


def small_tiles_ab(folder: Path) -> None:
    """int8 and int4 batch-1 decode with the default tiles and with smaller ones (or more warps) for the q/k/v
    and o products only, twice in turn."""
    from inferforge.llm import gemv, gemv_int4

    for rep in range(2):
        for quant in ("int8", "int4"):
            for name in ("default", *(n for q, n in SMALL_TILES if q == quant)):
                gemv.TUNED.clear()
                gemv_int4.TUNED.clear()
                table = gemv.TUNED if quant == "int8" else gemv_int4.TUNED
                for key, (bn, bk, w) in SMALL_TILES.get((quant, name), {}).items():
                    table[key] = gemv.TileConfig(bn, bk, w)  # type: ignore[index]
                RESULTS[f"smalltiles {quant} {name} rep{rep}"] = engine_numbers(
                    folder, quant, (1,), note=f" [{name}]"
                )
    gemv.TUNED.clear()
    gemv_int4.TUNED.clear()


def pre_convert_ab(folder: Path) -> None:
    """int8 and fp8 batch-1 decode with each program's first weight tile rebuilt as fp16 before its wait
    (`gemv.PRE_CONVERT`) and after it, twice in turn."""
    from inferforge.llm import gemv

    default = dict(gemv.PRE_CONVERT)
    for rep in range(2):
        for quant in ("int8", "fp8"):
            for on in (False, True):
                gemv.PRE_CONVERT[quant] = on
                RESULTS[f"preab {quant} {on} rep{rep}"] = engine_numbers(
                    folder, quant, (1,), note=f" [convert before wait {on}]"
                )
    gemv.PRE_CONVERT.update(default)


def splitk_ab(folder: Path, formats: tuple[str, ...] = ("int8", "fp8")) -> None:
    """int8 and fp8 engines at batch 64 with gemlite's own kernel choice and with split-K for the narrow
    products (`quant.SPLITK_NARROW`), twice in turn; bf16 once for the ratio."""
    from inferforge.llm import quant

    RESULTS["splitk bf16"] = engine_numbers(folder, None, (64,), note=" [bf16]")
    default = dict(quant.SPLITK_NARROW)
    for rep in range(2):
        for fmt in formats:
            for on in (False, True):
                quant.SPLITK_NARROW.update(on=on, formats=(fmt,))
                RESULTS[f"splitk {fmt} {on} rep{rep}"] = engine_numbers(
                    folder, fmt, (64,), note=f" [split-K narrow {on}]"
                )
    quant.SPLITK_NARROW.update(default)


def quant_start(folder: Path, fmt: str = "int8") -> None:
    """Start a quantized engine in a fresh process twice with an empty cache folder: the first tunes gemlite's
    kernels and writes their configurations, the second reads them (`llm/quant.py`)."""
    import os
    import subprocess
    import sys
    import tempfile

    code = (
        "import time; t0 = time.perf_counter(); from inferforge.llm.engine import EngineConfig, LLMEngine; "
        f"LLMEngine({str(folder)!r}, EngineConfig(device='cuda', quant={fmt!r}, max_num_seqs=64, "
        "kv_cache_tokens=64 * 640, max_model_len=1024, experimental_quant=True, decode_buckets=(1, 64))); "
        "print(f'START {time.perf_counter() - t0:.1f}')"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "INFERFORGE_CACHE": cache}
        for label in ("cold (tunes, writes the file)", "warm (reads the file)"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            seconds = next(
                (ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("START")), "failed"
            )
            RESULTS[f"quant_start_{fmt}_{label.split()[0]}_s"] = seconds
            row(f"engine {fmt} start, {label} (s)", seconds if seconds != "failed" else res.stderr[-300:])


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


def batch64_ab(folder: Path) -> None:
    """Batch-64 bf16 decode, twice in turn: logits written as fp32 by the GEMM or converted after it
    (run 6 also compared a pipelined attention loop: no faster, removed)."""
    variants = {"default": {}, "logits bf16 then fp32": {"fp32_logits_mm": False}}
    for rep in range(2):
        for name, knobs in variants.items():
            RESULTS[f"b64ab {name} rep{rep}"] = engine_numbers(
                folder, None, (64,), note=f" [{name}]", **knobs
            )


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
    row(f"batch-{batch} {quant or 'bf16'} graph: kernels per step, span (us)", f"{per_step}, {span:.0f}")
    for key, d in sorted(summary.items(), key=lambda kv: -kv[1]["adds_us"])[:12]:
        row(f"  {key[:50]}", f"n={d['count']} busy {d['busy_us']:.0f} us, adds {d['adds_us']:.0f} us")
    del eng
    free()


def quant_gemv(folder: Path) -> None:
    """int8 and fp8 (gemlite layers) at batch 1, the decode GEMVs reading the same bytes, for each way int8
    becomes fp32 in the kernel (`gemv._weights_f32`); gemlite's own batch-1 kernels as the peer."""
    from inferforge.llm import gemv, gemv_int4

    for mode in (6, 3):
        gemv.INT8_MODE["mode"] = mode
        RESULTS[f"int8_gemv_mode{mode}"] = engine_numbers(
            folder, "int8", (1,), note=f" gemv int8 mode {mode}"
        )
    gemv.INT8_MODE["mode"] = 6
    RESULTS["fp8_gemv"] = engine_numbers(folder, "fp8", (1,))
    for ptx in (True, False):
        gemv_int4.PTX_NIBBLES["on"] = ptx
        RESULTS[f"int4_gemv_ptx{ptx}"] = engine_numbers(folder, "int4", (1,), note=f" gemv int4 ptx {ptx}")
    gemv_int4.PTX_NIBBLES["on"] = True
    RESULTS["int8_gemlite"] = engine_numbers(folder, "int8", (1,), gemv_decode=False)
    RESULTS["fp8_gemlite"] = engine_numbers(folder, "fp8", (1,), gemv_decode=False)


def load_test(folder: Path, quant: str | None, batched_tokens: int = 2048, **knobs: object) -> dict:
    """64 concurrent requests, 128 prompt + 128 generated tokens, all arriving together."""
    eng = bench_engine(folder, quant, max_num_batched_tokens=batched_tokens, decode_buckets=(64,), **knobs)
    g = torch.Generator().manual_seed(0)
    out = {}
    refreeze()  # as the server's engine process does once loaded (a full collection stalled a step ~0.1 s)
    for rep in range(2):  # the first round warms up prefill shapes
        params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
        for i in range(64):
            eng.add_request(
                EngineRequest(
                    f"l{rep}-{i}", tuple(torch.randint(100, 500, (128,), generator=g).tolist()), params
                )
            )
        t0, n, first, t_first, wait0 = time.perf_counter(), 0, set(), 0.0, 0.0
        while eng.has_unfinished():
            outs = eng.step()
            n += sum(len(o.new_token_ids) for o in outs)
            first.update(o.request_id for o in outs)
            if len(first) == 64 and not t_first:
                t_first = time.perf_counter() - t0  # every request has its first token: prefill is over
                wait0 = eng.stats().device_wait_s_total
        wall = time.perf_counter() - t0
        out["tok_s"], out["prefill_ms"] = n / wall, t_first * 1e3
        out["decode_after_prefill_tok_s"] = (n - 64) / (wall - t_first)
        # Share of the decode phase the host loop spent waiting for the device: near 0, the host set the pace.
        out["decode_device_wait_frac"] = (eng.stats().device_wait_s_total - wait0) / (wall - t_first)
    gc.unfreeze()  # the next section's engines must be collectable
    row(
        f"engine {quant or 'bf16'} 64 x (128 in, 128 out) generated tokens/s, {batched_tokens} tokens/step"
        + "".join(f" {k}={v}" for k, v in knobs.items()),
        f"{out['tok_s']:,.0f} (first tokens after {out['prefill_ms']:.1f} ms, then "
        f"{out['decode_after_prefill_tok_s']:,.0f} tok/s, host waited on the device "
        f"{out['decode_device_wait_frac']:.0%} of it)",
    )
    ttft = []
    for rep in range(6):
        ids = tuple(torch.randint(100, 500, (512,), generator=g).tolist())
        t0 = time.perf_counter()
        eng.add_request(EngineRequest(f"t{rep}", ids, SamplingParams(max_tokens=1)))
        outs = []
        while not outs:
            outs = eng.step()
        ttft.append(time.perf_counter() - t0)
    out["ttft_512_ms"] = sorted(ttft[1:])[2] * 1e3
    row(f"engine {quant or 'bf16'} time to first token, 512-token prompt (ms)", f"{out['ttft_512_ms']:.1f}")
    if 64 in eng.runner.graphs:
        out["graph_b64_us"] = cuda_time(eng.runner.graphs[64][0].replay, iters=50) * 1e6
        row("  its batch-64 decode graph replay (GPU us/step)", f"{out['graph_b64_us']:.0f}")
    del eng
    free()
    return out


def blas_ab(folder: Path) -> None:
    """The load test with cuBLAS and with cuBLASLt as torch's GEMM library (each picks its own kernels for
    the batch-64 products, e.g. split-K with a separate reduce or not), twice in turn."""
    for rep in range(2):
        for lib in ("cublas", "cublaslt"):
            RESULTS[f"blasab {lib} rep{rep}"] = load_test(folder, None, 8192, gemm_library=lib)


def attn64_ab(folder: Path) -> None:
    """The load test (cuBLASLt, the engine's default) with batch-64 decode attention unsplit (two grid waves:
    one program per sequence and KV head) and split over 2 or 3 programs per (sequence, KV head) down to 64
    tokens each, twice in turn."""
    from inferforge.llm import triton_attn

    variants = {"unsplit": (2, 0), "waves 6 min 64": (6, 64), "waves 8 min 64": (8, 64)}
    for rep in range(2):
        for name, (waves, tokens) in variants.items():
            triton_attn.LARGE_BATCH_SPLIT.update(waves=waves, min_tokens=tokens)
            RESULTS[f"attn64ab {name} rep{rep}"] = load_test(folder, None, 8192)
            row(f"  [{name}]", "")
    triton_attn.LARGE_BATCH_SPLIT.update(waves=2, min_tokens=0)


def mlp_chunk_ab(folder: Path) -> None:
    """The load test with its 8,192-token prefill's MLP in one pass and in chunks of 2,048 and 1,024 tokens
    (`model.MLP_CHUNK`), twice in turn; its `prefill_ms` is what changes."""
    from inferforge.llm import model

    for rep in range(2):
        for tokens in (0, 2048, 1024):
            model.MLP_CHUNK["tokens"] = tokens
            RESULTS[f"mlpchunk {tokens} rep{rep}"] = load_test(folder, None, 8192)
            row(f"  [MLP chunk {tokens}]", "")
    model.MLP_CHUNK["tokens"] = 0


def decode_seconds(run, long: int, short: int, warm: int) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Seconds of `run(long)` minus `run(short)` (the difference is decode alone: prefill and set-up cancel),
    after two warm-up calls; also the warm-up's seconds (compilation, for the compiled peer)."""
    clk = Clock()
    run(warm)
    run(warm)
    warm_s = clk()
    times = []
    for k in (long, short):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run(k)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times[0] - times[1], warm_s


def closed_loop(folder: Path, mixed: bool, total: int = 384, conc: int = 64) -> float:
    """Generated tokens/s with `conc` requests always in flight: a new one (128 random prompt tokens, 64-192
    generated) joins as soon as one finishes, so arrivals and finishes are spread over the steps as in a
    server, and most steps carry a prompt chunk beside the decodes."""
    eng = bench_engine(folder, max_num_seqs=conc, kv_cache_tokens=conc * 400, mixed_steps=mixed)
    g = torch.Generator().manual_seed(1)

    def request(i: int) -> EngineRequest:
        n = int(torch.randint(64, 193, (1,), generator=g))
        ids = tuple(torch.randint(100, 500, (128,), generator=g).tolist())
        return EngineRequest(f"c{i}", ids, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))

    rates = []
    for _ in range(2):  # the first round warms up
        sent = 0
        for _ in range(conc):
            eng.add_request(request(sent))
            sent += 1
        t0, n = time.perf_counter(), 0
        while eng.has_unfinished():
            for o in eng.step():
                n += len(o.new_token_ids)
                if o.finished and sent < total:
                    eng.add_request(request(sent))
                    sent += 1
        rates.append(n / (time.perf_counter() - t0))
    row(f"engine bf16 closed loop, {conc} in flight, mixed_steps={mixed} (tokens/s)", f"{rates[-1]:,.0f}")
    del eng
    free()
    return rates[-1]


def hf_peer(folder: Path, compiled: bool) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    kw = {}
    if compiled:
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        kw = {"cache_implementation": "static"}
    ids = torch.randint(100, 500, (1, 16), device="cuda")
    n = 128

    def run(k: int) -> None:
        model.generate(ids, max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0, **kw)

    seconds, compile_s = decode_seconds(run, n, 1, warm=n)
    rate = (n - 1) / seconds
    row(
        f"peer HF generate {'static cache + torch.compile' if compiled else 'default'} batch 1 (tokens/s)",
        f"{rate:,.0f} (warm-up {compile_s:.0f}s)",
    )
    model = None
    free()
    return rate


def static_compile_peer(folder: Path, batch: int = 1, new_tokens: int = 128) -> float:
    """The plain gpt-fast-style peer: transformers' model with a StaticCache, one decode step compiled with
    `mode="reduce-overhead"` (CUDA graphs), called in a Python loop (transformers' `generate` trips over the
    graph's reused outputs in this version, so the loop is written out)."""
    from transformers import AutoModelForCausalLM, StaticCache

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).cuda().eval()
    prompt = 16
    cache = StaticCache(config=model.config, max_cache_len=prompt + new_tokens + 8)

    def forward(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = model(input_ids=ids, cache_position=pos, past_key_values=cache, use_cache=True)
        return out.logits[:, -1].argmax(-1, keepdim=True)

    step = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
    ids = torch.randint(100, 500, (batch, prompt), device="cuda")

    @torch.inference_mode()
    def run(n: int) -> None:
        cache.reset()
        tok = forward(ids, torch.arange(prompt, device="cuda"))  # prefill eager
        for i in range(n):
            torch.compiler.cudagraph_mark_step_begin()
            tok = step(tok, torch.tensor([prompt + i], device="cuda")).clone()

    seconds, compile_s = decode_seconds(run, new_tokens, 0, warm=8)
    rate = batch * new_tokens / seconds
    row(
        f"peer static cache + torch.compile loop, batch {batch} (tokens/s)",
        f"{rate:,.0f} (warm-up {compile_s:.0f}s)",
    )
    return rate  # the model is freed when this frame goes (the next section calls free())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="check,engine,ablation,load,hf,quant,compile,attention,profile")
    ap.add_argument("--quants", default="int8,fp8,int4")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    quants = args.quants.split(",")
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    steps = [
        ("check", check_tiny),
        ("mixed", check_mixed_steps),
        ("engine", lambda: RESULTS.__setitem__("bf16", engine_numbers(folder, None, (1, 64)))),
        (
            "compiled",
            lambda: RESULTS.__setitem__("bf16_compiled", engine_numbers(folder, None, (1, 64), True)),
        ),
        ("load", lambda: RESULTS.__setitem__("load_bf16", load_test(folder, None))),
        ("load8k", lambda: RESULTS.__setitem__("load_bf16_8192", load_test(folder, None, 8192))),
        (
            "loadab",
            lambda: [
                RESULTS.__setitem__(f"load_bf16_{t}_rep{r}", load_test(folder, None, t))
                for r in range(2)
                for t in (4096, 8192)
            ],
        ),
        (
            "gemvab",
            lambda: [
                RESULTS.__setitem__(
                    f"bf16_gemv={g}_pdl={p}", engine_numbers(folder, None, (1, 64), gemv_decode=g, pdl=p)
                )
                for g, p in ((False, False), (True, True))
            ],
        ),
        ("blasab", lambda: blas_ab(folder)),
        ("attn64ab", lambda: attn64_ab(folder)),
        ("mlpchunk", lambda: mlp_chunk_ab(folder)),
        ("quantgemv", lambda: quant_gemv(folder)),
        ("splitab", lambda: split_ab(folder)),
        (
            "int4ab",
            lambda: [
                RESULTS.__setitem__(
                    f"int4ab {name}", engine_numbers(folder, q, (1,), note=f" [{name}]", **kn)
                )
                for name, q, kn in (
                    ("bf16", None, {}),
                    ("int4 gemv", "int4", {}),
                    ("int4 gemlite", "int4", {"gemv_decode": False}),
                )
            ],
        ),
        ("int4tiles", lambda: int4_tiles_ab(folder)),
        ("int8tiles", lambda: int8_tiles_ab(folder)),
        ("smalltiles", lambda: small_tiles_ab(folder)),
        ("preab", lambda: pre_convert_ab(folder)),
        ("splitkab", lambda: splitk_ab(folder)),
        ("splitkab4", lambda: splitk_ab(folder, ("int4",))),
        ("b1ab", lambda: batch1_ab(folder)),
        ("graphprof", lambda: graph_profile(folder)),
        ("graphprof64", lambda: graph_profile(folder, 64)),
        ("graphprofq", lambda: [graph_profile(folder, 1, q) for q in ("int8", "int4")]),
        ("b64ab", lambda: batch64_ab(folder)),
        ("prefillprof", lambda: prefill_profile(folder)),
        ("quantstart", lambda: quant_start(folder)),
        (
            "closedab",
            lambda: [
                RESULTS.__setitem__(f"closed_loop_mixed={m}_{k}", closed_loop(folder, m))
                for k in range(2)
                for m in (False, True)
            ],
        ),
        (
            "mixedab",
            lambda: [
                RESULTS.__setitem__(f"load_{n}_mixed={m}", load_test(folder, None, n, mixed_steps=m))
                for n in (2048, 8192)
                for m in (False, True, False, True)
            ],
        ),
        (
            "ablation",
            lambda: [
                RESULTS.__setitem__(
                    f"bf16_fused={f}_overlap={o}",
                    engine_numbers(folder, None, (1, 64), fused_kernels=f, overlap_decode=o),
                )
                for f, o in ((False, False), (True, False))
            ],
        ),
        ("hf", lambda: RESULTS.__setitem__("hf_generate_tok_s", hf_peer(folder, False))),
        ("quant", lambda: [RESULTS.__setitem__(q, engine_numbers(folder, q, (1, 64))) for q in quants]),
        ("compile", lambda: RESULTS.__setitem__("static_compile_peer_tok_s", static_compile_peer(folder))),
        ("attention", lambda: RESULTS.__setitem__("attention_us", bench_parts.attention_section(row))),
        ("profile", lambda: RESULTS.__setitem__("profile", bench_parts.profile_section(folder, row))),
    ]
    for name, fn in steps:
        if name in sections:
            row(f"-- section {name} starts at (s)", f"{time.perf_counter() - T0:.0f}")
            try:
                fn()
            except Exception:
                traceback.print_exc()
                RESULTS[f"error_{name}"] = traceback.format_exc()
            write_json("bench_decode.json", RESULTS)
    print("\n".join(f"{a:58s} {b}" for a, b in ROWS))


if __name__ == "__main__":
    main()
