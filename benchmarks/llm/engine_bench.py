"""The engine measurements every section of `bench_decode.py` builds on: one engine per setting, decode
rates, graph replay times, the 64 x 128/128 load test, the closed loop, and the two peers (transformers
`generate`, a static-cache `torch.compile` loop). Shared state: RESULTS (written as JSON) and the table rows.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import Clock, cuda_time, free

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

T0 = time.perf_counter()
RESULTS: dict = {}  # bench_decode.main adds the device and torch version
ROWS: list[tuple[str, str]] = []


def row(name: str, value: str) -> None:
    ROWS.append((name, value))
    print(f"{name:58s} {value}", flush=True)


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
        # Off as in every run before K5 made it the engine's default: these sections time kernels and steps,
        # and some send the same prompts twice (bench_server.py measures the default)
        "enable_prefix_caching": False,
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


def load_test(folder: Path, quant: str | None, batched_tokens: int = 2048, **knobs: object) -> dict:
    """64 concurrent requests, 128 prompt + 128 generated tokens, all arriving together."""
    config: dict = {"max_num_batched_tokens": batched_tokens, "decode_buckets": (64,), **knobs}
    eng = bench_engine(folder, quant, **config)
    g = torch.Generator().manual_seed(0)
    out = {}
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
        stats = eng.stats()
        out["preemptions"], out["recomputed_tokens"] = stats.preemptions_total, stats.recomputed_tokens_total
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
