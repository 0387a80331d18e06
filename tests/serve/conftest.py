"""Real servers in subprocesses on loopback, serving real tiny torch models (see `tiny.py`)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from .tiny import write

REPO_ROOT = Path(__file__).resolve().parents[2]
KEY = "test-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log: Path

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def start_server(repo: Path, log_dir: Path, *args: str, wait_ready: bool = True) -> Server:
    port = free_port()
    log = log_dir / f"server-{port}.log"
    env = {**os.environ, "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [
        sys.executable,
        "-m",
        "inferforge.cli",
        "serve",
        str(repo),
        "--port",
        str(port),
        "--loader",
        "tests.serve.tiny:load",
        *args,
    ]
    with log.open("wb") as fh:
        process = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    path = "/v2/health/ready" if wait_ready else "/v2/health/live"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(server.url + path, timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server did not become ready:\n{log.read_text()}")


def make_repo(root: Path) -> Path:
    """tiny (versions 1 and 2, different weights) and slow (a 0.2 s model, max batch size 4)."""
    for name, version, options in [
        ("tiny", "1", {"seed": 1}),
        ("tiny", "2", {"seed": 2}),
        ("slow", "1", {"seed": 3, "delay_s": 0.2, "max_batch_size": 4}),
    ]:
        folder = write(root / name / version, **options)
        (folder / "manifest.json").write_text("{}")
    return root


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """No API keys, model control off, both tiny versions served, batching with a 2 ms window."""
    tmp = tmp_path_factory.mktemp("open")
    server = start_server(
        make_repo(tmp / "repo"),
        tmp,
        "--version-policy",
        "all",
        "--max-queue-delay-us",
        "2000",
        "--max-body-mib",
        "1",
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def secured_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    """API keys required; load/unload enabled; the repository folder is returned so tests can add versions."""
    tmp = tmp_path_factory.mktemp("secured")
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key per line\n{KEY}\n")
    repo = make_repo(tmp / "repo")
    server = start_server(repo, tmp, "--api-key-file", str(keys), "--enable-model-control")
    yield server, repo
    server.stop()
