"""The V2 server's fixed cost per request at low load, isolated on the CPU.

One closed-loop client sends batch-1 requests of one FP32 3x224x224 tensor (602 KB, the ResNet-50 input) in
the binary tensor extension, asking for a binary FP32 1000-wide output, and the script reports:
  * `predict` p50: the servable's own time at batch 1, called in this process on the same input;
  * server p50: the real `inferforge serve` (a subprocess, uvicorn) serving that servable;
  * trivial p50: the same client against a raw asyncio endpoint that reads the body and answers a canned
    response of the same size (what the client, the loopback and reading the bytes cost by themselves);
  * overhead = server p50 - predict p50, and what remains of it beyond the trivial endpoint.
The servable is a small real torch computation over the whole input (mean over the pixels, then a 3x1000
matrix product), so the server pays the same reads of the tensor a model would.

    OMP_NUM_THREADS=1 python benchmarks/serve/overhead_cpu.py --requests 2000 --reps 3
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
SHAPE = (3, 224, 224)
CLASSES = 1000
SRC: list[str] = []  # --src: serve another checkout's package (a before/after comparison)


class MeanServable:
    """Reads every pixel (a mean per channel) and maps 3 channels to 1000 logits: a known, small cost."""

    platform = "pytorch"

    def __init__(self, name: str = "overhead", version: str = "1", max_batch_size: int = 8) -> None:
        import torch

        from inferforge.registry.servable import BatchingHints, TensorSpec

        self.name, self.version, self.device = name, version, "cpu"
        self.weight = torch.linspace(-1.0, 1.0, 3 * CLASSES).reshape(3, CLASSES)
        self.inputs = (TensorSpec("input", "FP32", (-1, *SHAPE)),)
        self.outputs = (TensorSpec("logits", "FP32", (-1, CLASSES)),)
        self.batching = BatchingHints(max_batch_size=max_batch_size)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        with torch.inference_mode():
            pooled = torch.from_numpy(inputs["input"]).mean(dim=(2, 3))
            return {"logits": (pooled @ self.weight).numpy()}

    def close(self) -> None:
        pass


def load(path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"):  # type: ignore[no-untyped-def]
    """`--loader benchmarks.serve.overhead_cpu:load`: any folder holding a manifest.json serves it."""
    return MeanServable(name or "overhead", version)


def request_body(seed: int = 0) -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(seed).standard_normal((1, *SHAPE), dtype=np.float32)
    raw = x.tobytes()
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": [1, *SHAPE],
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
    header = json.dumps(doc).encode()
    return header + raw, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def closed_loop(
    port: int, path: str, body: bytes, headers: dict[str, str], n: int, warmup: int
) -> list[float]:
    """Latencies in ms of `n` requests sent one after another over one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times: list[float] = []
    for i in range(warmup + n):
        start = time.perf_counter_ns()
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        data = resp.read()
        elapsed = time.perf_counter_ns() - start
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {data[:300]!r}")
        if i >= warmup:
            times.append(elapsed / 1e6)
    conn.close()
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux): the server's work, less sensitive than latency
    to what else the machine is running."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def predict_ms(n: int) -> float:
    servable = MeanServable()
    x = np.frombuffer(request_body()[0][-4 * int(np.prod(SHAPE)) :], dtype=np.float32).reshape(1, *SHAPE)
    staged = np.empty_like(x)
    times = []
    for i in range(n + 50):
        start = time.perf_counter_ns()
        np.copyto(staged, x)  # the server's batcher copies the request into its staging buffer too
        servable.predict({"input": staged})
        if i >= 50:
            times.append((time.perf_counter_ns() - start) / 1e6)
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until_ready(port: int, proc: subprocess.Popen, path: str, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"server never became ready:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], port: int, ready_path: str, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONPATH": os.pathsep.join([*SRC, str(ROOT), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    wait_until_ready(port, proc, ready_path, log)
    return proc


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


# The trivial endpoint: a raw asyncio protocol that reads the whole body and answers canned bytes.


class _Trivial(asyncio.Protocol):
    def __init__(self, response: bytes) -> None:
        self.response = response
        self.buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).lower()
            length = 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(self.buffer) < end + 4 + length:
                return
            del self.buffer[: end + 4 + length]
            self.transport.write(self.response)  # type: ignore[attr-defined]


def serve_trivial(port: int, response_size: int) -> None:
    payload = b"x" * response_size
    response = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\n"
        + f"content-length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(loop.create_server(lambda: _Trivial(response), "127.0.0.1", port))
    try:
        loop.run_forever()
    except KeyboardInterrupt:
        server.close()


def measure(args: argparse.Namespace) -> dict:
    body, headers = request_body()
    work = Path(tempfile.mkdtemp(prefix="serve-overhead-"))
    folder = work / "repo" / "overhead" / "1"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text("{}")
    report: dict = {"request_bytes": len(body), "predict_ms": [], "server_ms": [], "trivial_ms": []}
    port = free_port()
    server_cmd = [
        sys.executable,
        "-m",
        "inferforge.cli",
        "serve",
        str(work / "repo"),
        "--port",
        str(port),
        "--loader",
        "benchmarks.serve.overhead_cpu:load",
        *args.server_args.split(),
    ]
    proc = start(server_cmd, port, "/v2/health/ready", work / "server.log")
    try:
        for _ in range(args.reps):
            report["predict_ms"].append(predict_ms(args.requests))
            cpu = cpu_seconds(proc.pid)
            lat = closed_loop(port, "/v2/models/overhead/infer", body, headers, args.requests, args.warmup)
            cpu = cpu_seconds(proc.pid) - cpu
            report["server_ms"].append(statistics.median(lat))
            report.setdefault("server_cpu_us", []).append(cpu / (args.requests + args.warmup) * 1e6)
            report.setdefault("server_p99_ms", []).append(float(np.percentile(lat, 99)))
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("POST", "/v2/models/overhead/infer", body, headers)
        response_size = len(conn.getresponse().read())
        conn.close()
    finally:
        stop(proc)
    tport = free_port()
    trivial_cmd = [
        sys.executable,
        __file__,
        "--trivial-port",
        str(tport),
        "--trivial-size",
        str(response_size),
    ]
    proc = start(trivial_cmd, tport, "/", work / "trivial.log")
    try:
        for _ in range(args.reps):
            cpu = cpu_seconds(proc.pid)
            lat = closed_loop(tport, "/infer", body, headers, args.requests, args.warmup)
            cpu = cpu_seconds(proc.pid) - cpu
            report["trivial_ms"].append(statistics.median(lat))
            report.setdefault("trivial_cpu_us", []).append(cpu / (args.requests + args.warmup) * 1e6)
    finally:
        stop(proc)
    report["response_bytes"] = response_size
    report["overhead_ms"] = [s - p for s, p in zip(report["server_ms"], report["predict_ms"], strict=True)]
    report["beyond_trivial_ms"] = [
        o - t for o, t in zip(report["overhead_ms"], report["trivial_ms"], strict=True)
    ]
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--server-args", default="", help="extra flags for inferforge serve")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--src", default=None, help="serve the inferforge package under this src folder")
    parser.add_argument("--trivial-port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--trivial-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trivial_port:
        serve_trivial(args.trivial_port, args.trivial_size)
        return
    if args.src:
        SRC.append(str(Path(args.src).resolve()))
    report = measure(args)
    report["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    report["cpu"] = f"{os.cpu_count()} cores"
    report["src"] = args.src or str(ROOT / "src")
    print(f"request {report['request_bytes']} B, response {report['response_bytes']} B")
    print(
        f"{'rep':>3} {'predict':>8} {'server':>8} {'overhead':>9} {'trivial':>8} {'beyond':>8}  (p50, ms)"
        f"  {'server CPU':>10} {'trivial CPU':>11} (us/request)"
    )
    for i in range(args.reps):
        print(
            f"{i:>3} {report['predict_ms'][i]:>8.3f} {report['server_ms'][i]:>8.3f}"
            f" {report['overhead_ms'][i]:>9.3f} {report['trivial_ms'][i]:>8.3f}"
            f" {report['beyond_trivial_ms'][i]:>8.3f}"
            f"  {report['server_cpu_us'][i]:>19.0f} {report['trivial_cpu_us'][i]:>11.0f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
