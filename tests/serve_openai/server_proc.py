"""Start the real `inferforge serve-llm` in a subprocess on 127.0.0.1 and a free port; wait for /health."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 120.0
CLI_MODULE = os.environ.get("INFERFORGE_TEST_CLI_MODULE", "inferforge.cli")
EXTRA_ARGS = os.environ.get("INFERFORGE_TEST_SERVER_ARGS", "").split()  # e.g. "--engine-mode process"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class ServerProc:
    proc: subprocess.Popen
    url: str
    log: Path

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def serve_cmd(model_dir: Path, port: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        CLI_MODULE,
        "serve-llm",
        str(model_dir),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "warning",
        *EXTRA_ARGS,
        *args,
    ]


def start_server(model_dir: Path, log: Path, *args: str) -> ServerProc:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            serve_cmd(model_dir, port, *args), stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    server = ServerProc(proc, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + "/health", timeout=1.0).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    server.stop()
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{server.log_tail()}")


def stream_in_background(url: str, payload: dict) -> tuple[threading.Thread, list[str], threading.Event]:
    """One streaming completion on a thread: (the thread, the SSE data lines so far, set at the first)."""
    chunks: list[str] = []
    started = threading.Event()

    def stream() -> None:
        with (
            httpx.Client(base_url=url, timeout=60) as c,
            c.stream("POST", "/v1/completions", json=payload) as r,
        ):
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line[6:])
                    started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    return thread, chunks, started
