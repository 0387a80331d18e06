"""`inferforge loadtest`: drive a V2 server and report throughput, goodput under a latency SLO, and
percentiles.

Two scenarios: `closed` keeps N requests in flight (each sender sends again as soon as it is answered);
`server` is MLPerf's server scenario, open-loop Poisson arrivals at a target rate, where latency counts
from the scheduled arrival, so a server that falls behind shows it. Senders are threads with persistent
connections, spread over several processes when one Python process would be the bottleneck. Only the
standard library speaks HTTP here, so the load generator runs wherever Python and numpy do."""

from __future__ import annotations

import http.client
import json
import math
import multiprocessing
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from inferforge.errors import InferforgeError
from inferforge.registry.servable import V2_TO_NUMPY


@dataclass(frozen=True)
class LoadTestConfig:
    """What `inferforge loadtest` takes; the CLI flags are these fields."""

    url: str
    """Server base URL, e.g. http://127.0.0.1:8000."""
    model: str
    """Model name to send requests to."""
    scenario: str = "closed"
    """closed (concurrency N, send again on answer) or server (open-loop Poisson arrivals at --qps)."""
    concurrency: int = 8
    """Requests in flight (closed), or sender threads, the most outstanding at once (server)."""
    qps: float = 100.0
    """Target arrival rate in requests per second (server scenario)."""
    duration: float = 10.0
    """Stop sending after this many seconds."""
    requests: int = 0
    """Stop after this many requests in all (0: only the duration bounds the run)."""
    batch_size: int = 1
    """Rows per request (dim 0 of every input)."""
    slo_ms: float = 100.0
    """Latency objective: goodput counts the answers within it."""
    binary: bool = True
    """Send inputs and ask for outputs in the binary tensor extension (else JSON tensors)."""
    processes: int = 1
    """Client processes to spread the senders over, so the client is not the bottleneck."""
    api_key_file: str | None = None
    """File whose first key is sent as the bearer token."""
    json_out: str | None = None
    """Write the report as JSON to this file."""
    timeout_s: float = 60.0
    """Socket timeout per request."""

    def __post_init__(self) -> None:
        if self.scenario not in ("closed", "server"):
            raise InferforgeError(f"--scenario {self.scenario!r}: use closed or server")
        if urlsplit(self.url).scheme != "http" or not urlsplit(self.url).hostname:
            raise InferforgeError(f"url {self.url!r}: give the server's base URL like http://127.0.0.1:8000")
        if self.concurrency < 1 or self.processes < 1 or self.batch_size < 1:
            raise InferforgeError("--concurrency, --processes and --batch-size must be >= 1")
        if self.processes > self.concurrency:
            raise InferforgeError(f"--processes {self.processes} exceeds --concurrency {self.concurrency}")
        if self.qps <= 0 or self.duration <= 0 or self.slo_ms <= 0 or self.requests < 0:
            raise InferforgeError("--qps, --duration and --slo-ms must be > 0 and --requests >= 0")


def _connect(url: str, timeout: float) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)


def _headers(cfg: LoadTestConfig) -> dict[str, str]:
    if not cfg.api_key_file:
        return {}
    key = next(k.strip() for k in Path(cfg.api_key_file).read_text().splitlines() if k.strip())
    return {"Authorization": f"Bearer {key}"}


def build_body(metadata: dict, batch_size: int, binary: bool, seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """One infer body with random inputs shaped by the model's metadata (variable inner dims are refused)."""
    rng = np.random.default_rng(seed)
    inputs, chunks = [], []
    for spec in metadata["inputs"]:
        shape = [batch_size, *spec["shape"][1:]]
        if any(d < 0 for d in shape):
            raise InferforgeError(
                f"input {spec['name']!r} has a variable inner dimension {spec['shape']}; "
                "the load generator needs fixed shapes"
            )
        datatype = spec["datatype"]
        if datatype == "BF16" and binary:  # bfloat16 bits: the upper half of float32
            arr = ((rng.standard_normal(shape, dtype=np.float32) * 3).view(np.uint32) >> 16).astype(np.uint16)
        elif datatype in V2_TO_NUMPY:
            arr = (rng.standard_normal(shape) * 3).astype(V2_TO_NUMPY[datatype])
        else:
            raise InferforgeError(
                f"input {spec['name']!r} is {datatype}, which the load generator cannot make up"
                + (" (BF16 needs --binary)" if datatype == "BF16" else "")
            )
        entry: dict = {"name": spec["name"], "datatype": spec["datatype"], "shape": shape}
        if binary:
            raw = arr.tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        inputs.append(entry)
    doc = {"inputs": inputs, "parameters": {"binary_data_output": binary}}
    header = json.dumps(doc).encode()
    if not binary:
        return header, {"Content-Type": "application/json"}
    return b"".join([header, *chunks]), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def _sender(
    cfg: LoadTestConfig,
    body: bytes,
    headers: dict[str, str],
    t0: float,
    arrivals: list[float] | None,
    quota: int,
    out: list[tuple[float, float, int]],
) -> None:
    """Send until the duration or the quota ends; record (scheduled start, latency, status; 0 = no answer)."""
    path = f"{urlsplit(cfg.url).path.rstrip('/')}/v2/models/{cfg.model}/infer"
    conn = _connect(cfg.url, cfg.timeout_s)
    end = t0 + cfg.duration
    sent = 0
    while quota == 0 or sent < quota:
        if arrivals is not None:
            if sent >= len(arrivals):
                break
            scheduled = t0 + arrivals[sent]
            wait = scheduled - time.time()
            if wait > 0:
                time.sleep(wait)
        else:
            scheduled = time.time()
        if scheduled >= end:
            break
        sent += 1
        try:
            conn.request("POST", path, body, headers)
            resp = conn.getresponse()
            resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
            conn = _connect(cfg.url, cfg.timeout_s)
        out.append((scheduled, time.time() - scheduled, status))
    conn.close()


def _process(
    cfg: LoadTestConfig, body: bytes, headers: dict[str, str], t0: float, threads: int, index: int, quota: int
) -> list[tuple[float, float, int]]:
    results: list[list[tuple[float, float, int]]] = [[] for _ in range(threads)]
    workers = []
    for i in range(threads):
        arrivals = None
        if cfg.scenario == "server":
            rng = np.random.default_rng(1000 * index + i)
            rate = cfg.qps / (threads * cfg.processes)
            n = int(rate * cfg.duration * 1.5) + 16
            arrivals = np.cumsum(rng.exponential(1.0 / rate, size=n)).tolist()
        share = 0 if quota == 0 else quota // threads + (1 if i < quota % threads else 0)
        if quota and not share:
            continue
        workers.append(
            threading.Thread(target=_sender, args=(cfg, body, headers, t0, arrivals, share, results[i]))
        )
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return [r for part in results for r in part]


def _child(
    cfg: LoadTestConfig,
    body: bytes,
    headers: dict[str, str],
    threads: int,
    index: int,
    quota: int,
    barrier,
    starts,
    results,
) -> None:  # type: ignore[no-untyped-def]
    barrier.wait()  # every process is imported and ready: the clock starts for all of them together
    results.put(_process(cfg, body, headers, starts.get(), threads, index, quota))


def _spawn(
    cfg: LoadTestConfig, body: bytes, headers: dict[str, str], per_process: list[int], quotas: list[int]
) -> tuple[list[tuple[float, float, int]], float]:
    ctx = multiprocessing.get_context("spawn")
    barrier, starts, results = ctx.Barrier(cfg.processes + 1), ctx.Queue(), ctx.Queue()
    children = [
        ctx.Process(
            target=_child,
            args=(cfg, body, headers, per_process[i], i, quotas[i], barrier, starts, results),
            daemon=True,
        )
        for i in range(cfg.processes)
    ]
    for child in children:
        child.start()
    barrier.wait(timeout=120)
    t0 = time.time() + 0.05
    for _ in children:
        starts.put(t0)
    samples = [s for _ in children for s in results.get(timeout=cfg.duration + cfg.timeout_s + 60)]
    for child in children:
        child.join(10)
    return samples, t0


def _fetch_metadata(cfg: LoadTestConfig, headers: dict[str, str]) -> dict:
    conn = _connect(cfg.url, cfg.timeout_s)
    try:
        conn.request("GET", f"{urlsplit(cfg.url).path.rstrip('/')}/v2/models/{cfg.model}", headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    except OSError as exc:
        raise InferforgeError(f"cannot reach {cfg.url}: {exc}") from None
    finally:
        conn.close()
    if resp.status != 200:
        raise InferforgeError(
            f"model {cfg.model!r} metadata from {cfg.url}: HTTP {resp.status} {data[:200]!r}"
        )
    return json.loads(data)


def run(cfg: LoadTestConfig) -> dict:
    """Run the load and return the report (also written to `json_out` when set)."""
    headers = _headers(cfg)
    body, body_headers = build_body(_fetch_metadata(cfg, headers), cfg.batch_size, cfg.binary)
    headers = {**headers, **body_headers}
    per_process = [
        cfg.concurrency // cfg.processes + (1 if i < cfg.concurrency % cfg.processes else 0)
        for i in range(cfg.processes)
    ]
    quotas = [
        0
        if cfg.requests == 0
        else cfg.requests // cfg.processes + (1 if i < cfg.requests % cfg.processes else 0)
        for i in range(cfg.processes)
    ]
    if cfg.processes == 1:
        t0 = time.time() + 0.05
        samples = _process(cfg, body, headers, t0, per_process[0], 0, quotas[0])
    else:
        samples, t0 = _spawn(cfg, body, headers, per_process, quotas)
    report = summarize(cfg, samples, t0)
    if cfg.json_out:
        Path(cfg.json_out).write_text(json.dumps(report, indent=2))
    return report


def summarize(cfg: LoadTestConfig, samples: list[tuple[float, float, int]], t0: float) -> dict:
    ok = np.array([lat for _, lat, status in samples if status == 200])
    statuses: dict[str, int] = {}
    for _, _, status in samples:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    finish = max((s + lat for s, lat, _ in samples), default=t0)
    elapsed = max(finish - t0, 1e-9)
    good = int((ok <= cfg.slo_ms / 1e3).sum()) if ok.size else 0

    def pct(q: float) -> float:
        return float(np.percentile(ok, q) * 1e3) if ok.size else math.nan

    return {
        "config": asdict(cfg),
        "sent": len(samples),
        "ok": int(ok.size),
        "statuses": statuses,
        "elapsed_s": elapsed,
        "throughput_rps": ok.size / elapsed,
        "throughput_rows_per_s": ok.size * cfg.batch_size / elapsed,
        "goodput_rps": good / elapsed,
        "slo_ms": cfg.slo_ms,
        "latency_ms": {
            "p50": pct(50),
            "p90": pct(90),
            "p99": pct(99),
            "mean": float(ok.mean() * 1e3) if ok.size else math.nan,
        },
    }


def format_report(report: dict) -> str:
    lat = report["latency_ms"]
    rows = [
        ("requests sent / ok", f"{report['sent']} / {report['ok']}"),
        ("statuses", ", ".join(f"{k}: {v}" for k, v in sorted(report["statuses"].items()))),
        (
            "throughput",
            f"{report['throughput_rps']:.1f} req/s ({report['throughput_rows_per_s']:.1f} rows/s)",
        ),
        (f"goodput (<= {report['slo_ms']:g} ms)", f"{report['goodput_rps']:.1f} req/s"),
        ("latency p50 / p90 / p99", f"{lat['p50']:.2f} / {lat['p90']:.2f} / {lat['p99']:.2f} ms"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
