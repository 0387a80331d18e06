"""CPU cost of the OpenAI server's HTTP side, per request and per streamed token, for 1..N HTTP workers.

Why: on the H100 the one HTTP process was the server's limit (0.75-0.81 of the engine, docs/llm-runs.md I8-
I10). The figure that decides how many workers a load needs, and whether a change to the HTTP path helped, is
CPU time per request and per token, which any machine can measure: it is CPU seconds, read from /proc, not
wall time. Two closed loops of the same requests with a short and a long generation separate the two costs:
    http_cpu = requests * per_request + tokens * per_token.
The tiny model runs on the CPU, so the engine process takes one core whatever the HTTP side does.

    python benchmarks/serve_openai/http_cost.py --variants 1:1 2:1 1:4 [--profile]

(a variant is HTTP workers:stream interval, i.e. --api-server-count and --stream-interval).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from inferforge.serve.openai.loadtest import LoadTestConfig, run_samples

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return [c for c in out if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]


def http_pids(url: str, server_pid: int, workers: int) -> list[int]:
    """The processes that run the HTTP app: the server itself, or each worker (their pids from /metrics)."""
    if workers == 1:
        return [server_pid]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = httpx.get(url + "/metrics").text
        pids = [int(p) for p in re.findall(r'http_worker_up\{pid="(\d+)"\}', text)]
        if len(pids) == workers:
            return pids
        time.sleep(0.2)
    raise RuntimeError("workers did not all start")


def start(
    model: Path, workers: int, interval: int, port: int, log: Path, profile: Path | None
) -> subprocess.Popen:
    prefix = ["-m", "cProfile", "-o", str(profile)] if profile else []
    cmd = [sys.executable, *prefix, "-m", "inferforge.cli", "serve-llm", str(model), "--device", "cpu",
           "--port", str(port), "--max-num-seqs", "64", "--log-level", "warning",
           "--api-server-count", str(workers), "--stream-interval", str(interval)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(log.read_text()[-2000:])
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError("server did not come up")


def load(url: str, a: argparse.Namespace, gen: int) -> dict[str, Any]:
    cfg = LoadTestConfig(url=url, concurrency=a.concurrency, max_tokens=gen, requests=a.requests,
                         duration_s=600, ignore_eos=True)  # fmt: skip
    rows = [{"prompt": [10 + (7 * k + j) % 200 for j in range(a.prompt_len)]} for k in range(a.requests)]
    samples, wall = asyncio.run(run_samples(cfg, rows))
    bad = [s.error for s in samples if not s.ok]
    if bad:
        raise RuntimeError(f"{len(bad)} requests failed: {bad[:3]}")
    chunks = sum(len(s.itl) + 1 for s in samples)  # token-carrying chunks (one per inter-chunk gap, plus one)
    return {
        "requests": len(samples),
        "tokens": sum(s.tokens for s in samples),
        "chunks": chunks,
        "wall_s": wall,
    }


def measure(url: str, a: argparse.Namespace, gen: int, http: list[int], engine: int) -> dict[str, Any]:
    h0, e0, c0 = sum(cpu_s(p) for p in http), cpu_s(engine), time.process_time()
    run = load(url, a, gen)
    run["http_cpu_s"] = sum(cpu_s(p) for p in http) - h0
    run["engine_cpu_s"] = cpu_s(engine) - e0
    run["client_cpu_s"] = time.process_time() - c0
    run["tokens_per_s"] = run["tokens"] / run["wall_s"]
    return run


def variant(model: Path, workers: int, interval: int, a: argparse.Namespace, out: Path) -> dict[str, Any]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tag = f"w{workers}_i{interval}"
    prof = out / f"http_{tag}.prof" if a.profile and workers == 1 else None
    proc = start(model, workers, interval, port, out / f"server_{tag}.log", prof)
    url = f"http://127.0.0.1:{port}"
    try:
        http = http_pids(url, proc.pid, workers)
        (engine,) = [c for c in children(proc.pid) if c not in http]
        load(url, a, 4)  # warm-up: connections, first graphs of every batch size
        short = [measure(url, a, a.short_gen, http, engine) for _ in range(a.reps)]
        long = [measure(url, a, a.long_gen, http, engine) for _ in range(a.reps)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    runs = {"short": short, "long": long}
    return {"workers": workers, "stream_interval": interval, **runs, **costs(short, long)}


def costs(short: list[dict], long: list[dict]) -> dict[str, float]:
    """Solve http_cpu = R * per_request + C * per_chunk from the medians of the two loads (same R).

    Chunks, not tokens: how many tokens a chunk carries depends on how far the HTTP side lags behind the
    engine (late deltas are merged) and on --stream-interval, while the work is done once per chunk."""
    import statistics

    def med(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    r = med(short, "requests")
    k_s, k_l = med(short, "chunks"), med(long, "chunks")
    c_s, c_l = med(short, "http_cpu_s"), med(long, "http_cpu_s")
    per_chunk = (c_l - c_s) / (k_l - k_s)
    per_request = (c_s - k_s * per_chunk) / r
    return {
        "http_cpu_us_per_chunk": per_chunk * 1e6,
        "http_cpu_ms_per_request": per_request * 1e3,
        "http_cpu_us_per_token_long": c_l / med(long, "tokens") * 1e6,
        "tokens_per_chunk_long": med(long, "tokens") / k_l,
        "tokens_per_s_long": med(long, "tokens_per_s"),
        "http_cores_busy_long": c_l / med(long, "wall_s"),
        "engine_cores_busy_long": med(long, "engine_cpu_s") / med(long, "wall_s"),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variants", nargs="+", default=["1:1", "2:1"], help="HTTP workers:stream interval")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--short-gen", type=int, default=8)
    p.add_argument("--long-gen", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--profile", action="store_true", help="cProfile the one-worker server's HTTP process")
    p.add_argument("--json", default=None)
    a = p.parse_args()
    from inferforge.llm.tiny import make_tiny_llama

    out = Path(os.environ.get("OUT", tempfile.mkdtemp()))
    model = make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny")
    res: dict[str, Any] = {"args": vars(a), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           "cores": os.cpu_count(), "variants": []}  # fmt: skip
    for text in a.variants:
        w, i = (int(x) for x in text.split(":"))
        v = variant(model, w, i, a, out)
        res["variants"].append(v)
        print(f"workers {w}, stream interval {i}: HTTP CPU {v['http_cpu_ms_per_request']:.3f} ms/request + "
              f"{v['http_cpu_us_per_chunk']:.1f} us/chunk; long load: "
              f"{v['tokens_per_chunk_long']:.2f} tokens/chunk, "
              f"{v['http_cpu_us_per_token_long']:.1f} us/token, {v['tokens_per_s_long']:.0f} tok/s, "
              f"HTTP cores busy {v['http_cores_busy_long']:.2f}, engine {v['engine_cores_busy_long']:.2f}",
              flush=True)  # fmt: skip
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    if a.profile:
        import pstats

        for prof in sorted(out.glob("http_w1_*.prof")):
            pstats.Stats(str(prof)).sort_stats("tottime").print_stats(35)


if __name__ == "__main__":
    main()
