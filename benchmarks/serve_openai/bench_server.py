"""The OpenAI server against its own engine, in one run: is HTTP + SSE within 10% of the engine's tokens/s?

Run on a CUDA machine (fastapi/uvicorn from .whl):
    python benchmarks/serve_openai/bench_server.py
Peer, measured in the same run: the same `AsyncLLMEngine` driven in-process (no HTTP), same model, same
flags, same prompts, same closed loop. Model: random bf16 weights in the Llama-3.2-1B shape
(benchmarks/llm/common.py). Closed loop, 64 concurrent streams, 128 prompt + 128 generated tokens
(ignore_eos), after `--warmup-reps` discarded loops; then `--waves` waves of 64 requests arriving together
(the issue's "64 concurrent requests": tokens generated / time from release to the last token), on three
sides: `LLMEngine.step()` in a plain loop (the setting of the 35,000 tok/s engine figure, this run's flags),
the `AsyncLLMEngine` in-process, and the server; then time to first token of a 512-token prompt at low load
(one request at a time). Prints a table; writes bench_server.json under $OUT.
CPU dry run of the plumbing: --device cpu --tiny --requests 16 --concurrency 4 --gen 8 --ttft-prompt 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
CLI_MODULE = os.environ.get("INFERFORGE_CLI_MODULE", "inferforge.cli")


def prompts(n: int, length: int, seed: int) -> list[tuple[int, ...]]:
    rng = random.Random(seed)
    return [tuple(rng.randrange(100, 500) for _ in range(length)) for _ in range(n)]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))] if v else float("nan")


# ---- the peer: the engine in-process ---------------------------------------------------------------------
async def engine_closed_loop(eng: Any, rows: list[tuple[int, ...]], concurrency: int, gen: int) -> dict:
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    next_row, tokens, ttfts = 0, 0, []

    async def worker() -> None:
        nonlocal next_row, tokens
        while next_row < len(rows):
            k = next_row
            next_row += 1
            t0 = time.perf_counter()
            first = True
            async for out in eng.generate(EngineRequest(f"e{id(rows)}-{k}", rows[k], params)):
                if first:
                    ttfts.append(time.perf_counter() - t0)
                    first = False
                tokens += len(out.new_token_ids)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": pct(ttfts, 0.5) * 1e3,
    }


async def engine_ttft(eng: Any, rows: list[tuple[int, ...]]) -> list[float]:
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    out = []
    for k, ids in enumerate(rows):
        t0 = time.perf_counter()
        async for _ in eng.generate(
            EngineRequest(f"t{k}", ids, SamplingParams(max_tokens=1, temperature=0.0))
        ):
            out.append(time.perf_counter() - t0)
    return out


def sync_closed_loop(eng: Any, rows: list[tuple[int, ...]], concurrency: int, gen: int, tag: str) -> dict:
    """The closed loop driven by `LLMEngine.step()` alone: a finished request's successor is added before
    the next step (no asyncio, no HTTP): the engine's own capacity under continuous arrivals."""
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=gen, temperature=0.0, ignore_eos=True)
    for k in range(min(concurrency, len(rows))):
        eng.add_request(EngineRequest(f"{tag}-{k}", rows[k], params))
    started, tokens, t0 = min(concurrency, len(rows)), 0, time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            tokens += len(o.new_token_ids)
            if o.finished and started < len(rows):
                eng.add_request(EngineRequest(f"{tag}-{started}", rows[started], params))
                started += 1
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


def sync_waves(a: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    """`a.waves` waves of `a.concurrency` requests arriving together, then `a.reps` closed loops, driven by
    `LLMEngine.step()` in this thread (no asyncio, no HTTP), after warm-ups; the engine is freed before the
    async one loads."""
    import gc

    import torch

    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    eng = LLMEngine(Path(a.model_dir), EngineConfig(**engine_flags(a)))  # its heap frozen once loaded
    params = SamplingParams(max_tokens=a.gen, temperature=0.0, ignore_eos=True)
    out = []
    for w in range(a.waves + 1):
        for k, ids in enumerate(prompts(a.concurrency, a.prompt_len, 100 + w)):
            eng.add_request(EngineRequest(f"s{w}-{k}", ids, params))
        t0, n = time.perf_counter(), 0
        while eng.has_unfinished():
            n += sum(len(o.new_token_ids) for o in eng.step())
        wall = time.perf_counter() - t0
        if w:
            out.append({"tokens": n, "wall_s": wall, "tokens_per_s": n / wall})
    for r in range(a.warmup_reps):
        sync_closed_loop(eng, prompts(a.requests, a.prompt_len, 5 + r), a.concurrency, a.gen, f"w{r}")
    loops = [
        sync_closed_loop(eng, prompts(a.requests, a.prompt_len, 10 + r), a.concurrency, a.gen, f"c{r}")
        for r in range(a.reps)
    ]
    del eng
    gc.unfreeze()
    gc.collect()
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out, loops


def engine_flags(a: argparse.Namespace) -> dict[str, Any]:
    """The engine flags both peers and the server share (the server gets them on its command line)."""
    from inferforge.serve.openai.cli import parse_token_buckets

    return {
        "device": a.device,
        "max_num_seqs": a.max_num_seqs,
        "max_waiting": 1024,
        "max_num_batched_tokens": a.max_num_batched_tokens,
        "max_model_len": a.max_model_len,
        "admit_delay_steps": a.admit_delay_steps,
        "prefill_graph_tokens": parse_token_buckets(a.prefill_graph_tokens, "--prefill-graph-tokens"),
        "enable_prefix_caching": a.prefix_caching,
    }


def engine_mode(a: argparse.Namespace) -> None:
    from inferforge.llm.async_engine import AsyncLLMEngine

    sync, sync_loops = sync_waves(a) if a.waves else ([], [])
    eng = AsyncLLMEngine.from_pretrained(a.model_dir, **engine_flags(a))  # its heap frozen once loaded

    async def main() -> dict:
        res: dict = {"sync_waves": sync, "sync_closed_loop": sync_loops}
        await engine_closed_loop(eng, prompts(a.concurrency, a.prompt_len, 1), a.concurrency, 16)  # warm-up
        for r in range(a.warmup_reps):  # every step shape the measured loops meet, met once
            await engine_closed_loop(eng, prompts(a.requests, a.prompt_len, 5 + r), a.concurrency, a.gen)
        res["throughput"] = [
            await engine_closed_loop(eng, prompts(a.requests, a.prompt_len, 10 + r), a.concurrency, a.gen)
            for r in range(a.reps)
        ]
        res["waves"] = [
            await engine_closed_loop(eng, prompts(a.concurrency, a.prompt_len, 100 + w), a.concurrency, a.gen)
            for w in range(1, a.waves + 1)
        ]
        await engine_ttft(eng, prompts(3, a.ttft_prompt, 2))  # warm-up
        res["ttft_s"] = await engine_ttft(eng, prompts(a.ttft_reps, a.ttft_prompt, 3))
        await eng.shutdown(0)
        return res

    Path(a.json).write_text(json.dumps(asyncio.run(main())))


# ---- through the server ----------------------------------------------------------------------------------
def client_proc(args: tuple[str, int, int, int, list[tuple[int, ...]], float]) -> dict:
    from inferforge.serve.openai.loadtest import LoadTestConfig, run_samples

    url, concurrency, requests, gen, rows, start_at = args
    cfg = LoadTestConfig(
        url=url, concurrency=concurrency, max_tokens=gen, requests=requests, duration_s=600, ignore_eos=True
    )
    cpu0 = time.process_time()
    # Every client process starts together; connections opened before (a client's steady state).
    samples, _ = asyncio.run(run_samples(cfg, [{"prompt": list(r)} for r in rows], start_at))
    return {
        "end": time.time(),  # after asyncio.run's teardown (connections closed): the figure before T16
        "last_answer": max((s.ended_at for s in samples if s.ok), default=time.time()),
        "tokens": sum(s.tokens for s in samples if s.ok),
        "errors": [s.error for s in samples if not s.ok][:3],
        "ok": sum(s.ok for s in samples),
        "ttft": [s.ttft for s in samples if s.ok],
        "itl": [g for s in samples if s.ok for g in s.itl],
        "cpu_s": time.process_time() - cpu0,
    }


def _client_init(nice: int = 0, cpus: set[int] | None = None) -> None:
    if nice:
        os.nice(nice)
    if cpus:
        os.sched_setaffinity(0, cpus)
    import httpx  # noqa: F401

    import inferforge.serve.openai.loadtest  # noqa: F401


def cpu_seconds(pid: int) -> dict[str, float]:
    """user + system CPU seconds of a process and of each of its child processes (Linux /proc): which side
    of the server (HTTP process, engine process) runs out of cores."""
    tick = os.sysconf("SC_CLK_TCK")

    def one(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / tick

    out = {"server": one(pid)}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out[f"child {child}"] = one(int(child))
    return out


def loop_seconds(url: str) -> dict[str, float]:
    """The engine process's cumulative loop seconds by phase and its device wait, from /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for smp in fam.samples:
            if smp.name == "inferforge_llm_engine_loop_seconds_total":
                out[smp.labels["phase"]] = smp.value
            elif smp.name == "inferforge_llm_engine_device_wait_seconds_total":
                out["device_wait"] = smp.value
    return out


def server_throughput(url: str, a: argparse.Namespace, seed: int, pool: Any, pid: int | None = None) -> dict:
    cpu0 = cpu_seconds(pid) if pid else {}
    loop0 = loop_seconds(url)
    rows = prompts(a.requests, a.prompt_len, seed)
    per = a.concurrency // a.client_procs
    n = a.requests // a.client_procs
    start_at = time.time() + 0.5
    jobs = [(url, per, n, a.gen, rows[i * n : (i + 1) * n], start_at) for i in range(a.client_procs)]
    parts = pool.map(client_proc, jobs)
    # From the release to the last answer's last line, as the engine peers' waves end at the last token; the
    # client processes' teardown after it (connections closed) is recorded apart.
    wall = max(p["last_answer"] for p in parts) - start_at
    wall_with_teardown = max(p["end"] for p in parts) - start_at
    tokens = sum(p["tokens"] for p in parts)
    cpu1 = cpu_seconds(pid) if pid else {}
    busy = {k: round((cpu1[k] - cpu0.get(k, 0.0)) / wall, 2) for k in cpu1}  # cores in use
    # Share of the wall time the engine loop spent in each busy phase. Idle is left out: the child sends its
    # figures with outputs only, so idle time from before the run is counted when the run's first step lands.
    loop1 = loop_seconds(url)
    loop_share = {k: round((v - loop0.get(k, 0.0)) / wall, 3) for k, v in loop1.items() if k != "idle"}
    ttft = [t for p in parts for t in p["ttft"]]
    itl = [t for p in parts for t in p["itl"]]
    return {
        "start_at": start_at,
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "wall_with_client_teardown_s": wall_with_teardown,
        "tokens_per_s_with_client_teardown": tokens / wall_with_teardown,
        "ok": sum(p["ok"] for p in parts),
        "errors": [e for p in parts for e in p["errors"]],
        "ttft_p50_ms": pct(ttft, 0.5) * 1e3,
        "itl_p50_ms": pct(itl, 0.5) * 1e3,
        "itl_p99_ms": pct(itl, 0.99) * 1e3,
        "cores_busy": busy,
        "engine_loop_share": loop_share,
        "client_cores_busy": round(sum(p["cpu_s"] for p in parts) / wall, 2),
    }


def server_ttft(url: str, rows: list[tuple[int, ...]], model: str) -> tuple[list[float], list[float]]:
    """Client-side time to the first SSE chunk, the server's x-inferforge-ttft-ms; one request at a time."""
    import httpx

    client_s, header_ms = [], []
    with httpx.Client(base_url=url, timeout=60) as c:
        for ids in rows:
            body = {"model": model, "prompt": list(ids), "max_tokens": 1, "stream": True, "temperature": 0.0}
            t0 = time.perf_counter()
            with c.stream("POST", "/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for line in lines:
                    if line.startswith("data: {"):
                        client_s.append(time.perf_counter() - t0)
                        break
                header_ms.append(float(r.headers.get("x-inferforge-ttft-ms", "nan")))
                for _ in lines:
                    pass
    return client_s, header_ms


def start_server(
    a: argparse.Namespace, log: Path, v: Variant, cpus: set[int] | None = None
) -> tuple[subprocess.Popen, str]:
    """serve-llm in a child process (on `cpus` only, with its own children, when given)."""
    import socket

    import httpx

    with socket.socket() as sock:  # a free port: other servers may share this machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [
        sys.executable,
        "-m",
        CLI_MODULE,
        "serve-llm",
        a.model_dir,
        "--port",
        str(port),
        "--device",
        a.device,
        "--max-num-seqs",
        str(a.max_num_seqs),
        "--max-waiting",
        "1024",
        "--log-level",
        "warning",
        "--max-tokens-cap",
        "4096",
        "--switch-interval-ms",
        str(v.switch_ms),
        "--engine-mode",
        v.mode,
        "--admit-delay-steps",
        str(a.admit_delay_steps),
        "--max-num-batched-tokens",
        str(a.max_num_batched_tokens),
        "--api-server-count",
        str(v.workers),
        "--stream-interval",
        str(v.interval),
        "--prefill-graph-tokens",
        a.prefill_graph_tokens,
        "--enable-prefix-caching" if a.prefix_caching else "--no-enable-prefix-caching",
        "--align-prompt-steps" if v.align else "--no-align-prompt-steps",
    ] + (["--max-model-len", str(a.max_model_len)] if a.max_model_len else [])
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus else None
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, preexec_fn=pin)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    raise RuntimeError("server did not come up")


T0 = time.perf_counter()


def phase(name: str) -> None:
    print(f"[{time.perf_counter() - T0:6.1f}s] {name}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", default="all", choices=["all", "engine"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--tiny", action="store_true", help="use the tiny test model (CPU dry run)")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192, help="of every engine (serve-llm's)")
    p.add_argument(
        "--prefill-graph-tokens",
        default="128,256,384,512,768,1024,1536,2048,4096,8192",
        help="of every engine (serve-llm's); none: prompt steps eager",
    )
    p.add_argument(
        "--prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="enable_prefix_caching of every engine (serve-llm's default: on)",
    )
    p.add_argument("--requests", type=int, default=768)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--ttft-prompt", type=int, default=512)
    p.add_argument("--ttft-reps", type=int, default=20)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--warmup-reps", type=int, default=1, help="closed loops run and discarded on each side")
    p.add_argument("--waves", type=int, default=8, help="waves of --concurrency requests arriving together")
    p.add_argument("--client-procs", type=int, default=4)
    p.add_argument("--json", default=None, help="the results file (default: bench_server.json under $OUT)")
    p.add_argument("--budget-s", type=float, default=200.0, help="start no further server variant after this")
    p.add_argument(
        "--variants",
        default="process:5",
        help="server runs: engine mode:switch ms[:HTTP workers (--api-server-count)[:stream interval"
        "[:clients: shared|nice|split[:noalign] (Variant)]]], ...",
    )
    p.add_argument("--admit-delay-steps", type=int, default=0, help="admit_delay_steps of both engines")
    p.add_argument(
        "--trace-engine",
        action="store_true",
        help="the engine process writes a line per step (INFERFORGE_ENGINE_TRACE) to engine_trace_*.jsonl",
    )
    p.add_argument(
        "--profile-engine",
        action="store_true",
        help="cProfile the engine process (INFERFORGE_ENGINE_PROFILE), print where its time goes; slows it",
    )
    a = p.parse_args()
    a.variants = [Variant.parse(v) for v in str(a.variants).split(",")]
    if a.mode == "engine":
        engine_mode(a)
        return
    out = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    if a.model_dir is None:
        if a.tiny:
            from inferforge.llm.tiny import make_tiny_llama

            a.model_dir = str(make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny"))
        else:
            sys.path.insert(0, str(HERE.parent / "llm"))
            from common import make_random_1b

            a.model_dir = str(make_random_1b(Path("/tmp/inferforge_llama1b")))
    res: dict[str, Any] = {"args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if a.device.startswith("cuda"):
        import torch

        res["device"] = torch.cuda.get_device_name(0)
    phase(f"model ready: {a.model_dir}")
    eng_json = out / "engine_raw.json"
    cmd = [sys.executable, __file__, "--mode", "engine", "--json", str(eng_json)]
    cmd += [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(a).items()
        if k not in ("mode", "json", "tiny", "variants", "budget_s", "profile_engine", "trace_engine")
        and v is not None
        and not isinstance(v, bool)
    ]
    cmd.append("--prefix-caching" if a.prefix_caching else "--no-prefix-caching")
    subprocess.run(cmd, check=True)
    res["engine"] = json.loads(eng_json.read_text())
    res["model_build_and_engine_s"] = time.perf_counter() - t_start
    phase(f"engine peer done: {[round(r['tokens_per_s']) for r in res['engine']['throughput']]} tok/s")
    for k, variant in enumerate(a.variants):
        if k and time.perf_counter() - T0 > a.budget_s:
            phase(f"skipping server variant {variant}: past --budget-s")
            continue
        key = f"server_{variant.key}"
        key += f"_run{k}" if key in res else ""  # a variant repeated in one call, for its spread
        res[key] = server_run(a, out, variant, k == 0, run=k)
        (out / "bench_server_partial.json").write_text(json.dumps(res, indent=2, default=str))
    report(res, Path(a.json) if a.json else out / "bench_server.json")


CLIENT_POLICIES = ("shared", "nice", "split")


@dataclass(frozen=True)
class Variant:
    """One server run. `clients` is where the load generator's processes run beside the server on this host:
    `shared` (anywhere, at the server's priority), `nice` (at nice 19, so the server's processes win every
    contended core), `split` (the server on the first half of this process's CPUs, the clients on the other
    half: as if the clients were on another machine with half the cores). `align=False` (the word `noalign`
    after the client policy) runs serve-llm with --no-align-prompt-steps."""

    mode: str
    switch_ms: float
    workers: int = 1
    interval: int = 1
    clients: str = "shared"
    align: bool = True

    @classmethod
    def parse(cls, text: str) -> Variant:
        parts = text.split(":")
        v = cls(
            parts[0],
            float(parts[1]),
            int(parts[2]) if len(parts) > 2 else 1,
            int(parts[3]) if len(parts) > 3 else 1,
            parts[4] if len(parts) > 4 else "shared",
            "noalign" not in parts[5:],
        )
        if v.clients not in CLIENT_POLICIES:
            raise SystemExit(f"--variants: client policy {v.clients!r} is not one of {CLIENT_POLICIES}")
        return v

    @property
    def key(self) -> str:
        key = f"{self.mode}_{self.switch_ms}" + (f"_{self.workers}w" if self.workers > 1 else "")
        key += f"_si{self.interval}" if self.interval > 1 else ""
        key += f"_clients-{self.clients}" if self.clients != "shared" else ""
        return key + ("" if self.align else "_noalign")

    def cpu_halves(self) -> tuple[set[int], set[int]] | None:
        """(server CPUs, client CPUs) for `split`; None otherwise."""
        if self.clients != "split":
            return None
        cpus = sorted(os.sched_getaffinity(0))
        half = len(cpus) // 2
        return set(cpus[:half]), set(cpus[half:])


def server_run(a: argparse.Namespace, out: Path, v: Variant, measure_ttft: bool, run: int = 0) -> dict:
    import httpx

    res: dict[str, Any] = {"engine_mode": v.mode, "switch_interval_ms": v.switch_ms,
                           "api_server_count": v.workers, "stream_interval": v.interval,
                           "clients": v.clients, "align_prompt_steps": v.align, "run": run}  # fmt: skip
    tag = f"{v.key}_run{run}"
    halves = v.cpu_halves()
    if halves:
        res["server_cpus"], res["client_cpus"] = sorted(halves[0]), sorted(halves[1])
    prof = out / f"engine_{tag}.prof"
    if a.profile_engine:
        os.environ["INFERFORGE_ENGINE_PROFILE"] = str(prof)
    if a.trace_engine:
        os.environ["INFERFORGE_ENGINE_TRACE"] = str(out / f"engine_trace_{tag}.jsonl")
    proc, url = start_server(a, out / f"server_{tag}.log", v, halves[0] if halves else None)
    phase(f"server up ({_tag(res)})")
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        warm = argparse.Namespace(**{**vars(a), "requests": a.concurrency, "gen": 16})
        init = (19 if v.clients == "nice" else 0, halves[1] if halves else None)
        with mp.get_context("spawn").Pool(a.client_procs, initializer=_client_init, initargs=init) as pool:
            server_throughput(url, warm, 1, pool)
            for r in range(a.warmup_reps):
                server_throughput(url, a, 5 + r, pool)
            res["throughput"] = [server_throughput(url, a, 10 + r, pool, proc.pid) for r in range(a.reps)]
            wave = argparse.Namespace(**{**vars(a), "requests": a.concurrency})
            res["waves"] = [server_throughput(url, wave, 100 + w, pool) for w in range(1, a.waves + 1)]
        phase(f"server throughput: {[round(r['tokens_per_s']) for r in res['throughput']]} tok/s")
        phase(f"server waves: {[round(r['tokens_per_s']) for r in res['waves']]} tok/s")
        phase(
            f"cores busy (server, engine child): {[r['cores_busy'] for r in res['throughput']]}; "
            f"clients: {[r['client_cores_busy'] for r in res['throughput']]}"
        )
        phase(f"engine loop share by phase: {[r['engine_loop_share'] for r in res['throughput']]}")
        if measure_ttft:
            server_ttft(url, prompts(3, a.ttft_prompt, 2), model)  # warm-up
            client_s, header_ms = server_ttft(url, prompts(a.ttft_reps, a.ttft_prompt, 3), model)
            res["ttft_client_s"], res["ttft_header_ms"] = client_s, header_ms
        res["metrics_tail"] = httpx.get(url + "/metrics").text[-1500:]
    finally:
        proc.send_signal(signal.SIGTERM)
        res["exit_code"] = proc.wait(120)
        os.environ.pop("INFERFORGE_ENGINE_PROFILE", None)
        os.environ.pop("INFERFORGE_ENGINE_TRACE", None)
    if a.profile_engine and prof.exists():
        print_profile(prof)
    return res


def print_profile(path: Path) -> None:
    """The engine process's top functions by own time and by cumulative time."""
    import pstats

    for key in ("tottime", "cumulative"):
        print(f"---- engine process profile by {key} ({path.name})", flush=True)
        pstats.Stats(str(path)).sort_stats(key).print_stats(30)


def _tag(run: dict) -> str:
    workers, interval = run.get("api_server_count", 1), run.get("stream_interval", 1)
    tag = f"{run['engine_mode']}, switch {run['switch_interval_ms']} ms, {workers} HTTP worker(s)"
    tag += f", stream interval {interval}" if interval > 1 else ""
    tag += f", clients {run['clients']}" if run.get("clients", "shared") != "shared" else ""
    tag += "" if run.get("align_prompt_steps", True) else ", prompt steps not aligned"
    return tag + (f", run {run['run']}" if "run" in run else "")  # a variant may repeat in one call


def report(res: dict, path: Path) -> None:
    eng = [r["tokens_per_s"] for r in res["engine"]["throughput"]]
    e_med = statistics.median(eng)
    runs = [v for k, v in res.items() if k.startswith(("server_thread_", "server_process_"))]
    first = runs[0]
    summary: dict[str, Any] = {"engine_tokens_per_s_median": e_med}
    sync = [w["tokens_per_s"] for w in res["engine"]["sync_waves"]]
    a_waves = [w["tokens_per_s"] for w in res["engine"]["waves"]]
    sync_loops = [x["tokens_per_s"] for x in res["engine"].get("sync_closed_loop", [])]
    if sync_loops:
        summary["closed loop: LLMEngine.step loop tok/s median"] = statistics.median(sync_loops)
    if sync:
        summary["waves: LLMEngine.step loop tok/s median"] = statistics.median(sync)
        summary["waves: AsyncLLMEngine in-process tok/s median"] = statistics.median(a_waves)
    for r in runs:
        if r.get("waves"):
            s_wave = statistics.median(w["tokens_per_s"] for w in r["waves"])
            tag = _tag(r)
            summary[f"waves: server tok/s median ({tag})"] = s_wave
            summary[f"waves: server / AsyncLLMEngine ({tag})"] = s_wave / statistics.median(a_waves)
            summary[f"waves: server / LLMEngine.step loop ({tag})"] = s_wave / statistics.median(sync)
        s_med = statistics.median(x["tokens_per_s"] for x in r["throughput"])
        tag = _tag(r)
        summary[f"server tokens/s median ({tag})"] = s_med
        summary[f"server / engine ({tag})"] = s_med / e_med
        if sync_loops:
            key = f"closed loop: server / LLMEngine.step loop ({tag})"
            summary[key] = s_med / statistics.median(sync_loops)
        summary[f"server errors, exit code ({tag})"] = (
            f"{sum(len(x['errors']) for x in r['throughput'])}, {r['exit_code']}"
        )
    summary["engine TTFT 512-token prompt ms median"] = statistics.median(res["engine"]["ttft_s"]) * 1e3
    summary["server TTFT 512 client-side ms median"] = statistics.median(first["ttft_client_s"]) * 1e3
    summary["server TTFT 512 client-side ms p90"] = pct(first["ttft_client_s"], 0.9) * 1e3
    summary["server TTFT 512 engine-side (header) ms median"] = statistics.median(first["ttft_header_ms"])
    res["summary"] = summary
    path.write_text(json.dumps(res, indent=2, default=str))
    print(f"device: {res.get('device', 'cpu')}  date: {res['date']}")
    for k, v in summary.items():
        print(f"{k:52s} {v:.3f}" if isinstance(v, float) else f"{k:52s} {v}")
    print("engine tokens/s per rep:", [round(x) for x in eng])
    print("closed loop tok/s, LLMEngine.step loop:", [round(x) for x in sync_loops])
    print("waves tok/s, LLMEngine.step loop:", [round(x) for x in sync])
    print("waves tok/s, AsyncLLMEngine:", [round(x) for x in a_waves])
    for r in runs:
        waves = [round(w["tokens_per_s"]) for w in r.get("waves", [])]
        print(f"waves tok/s, server ({_tag(r)}):", waves)
    print("engine per rep ttft p50 ms:", [round(r["ttft_p50_ms"], 1) for r in res["engine"]["throughput"]])
    for r in runs:
        print(
            f"server ({_tag(r)}) tok/s, ttft p50, itl p50/p99 ms:",
            [
                (
                    round(x["tokens_per_s"]),
                    round(x["ttft_p50_ms"], 1),
                    round(x["itl_p50_ms"], 2),
                    round(x["itl_p99_ms"], 2),
                )
                for x in r["throughput"]
            ],
        )


if __name__ == "__main__":
    main()
