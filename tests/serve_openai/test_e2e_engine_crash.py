"""The engine's child process dies (SIGKILL): streams end with an error event, new requests get 503 in
OpenAI's shape, /health turns 503, nothing hangs, and SIGTERM still exits 0."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
import pytest

from .server_proc import start_server, stream_in_background


def engine_pids(pid: int) -> list[int]:
    """Children of the server started by multiprocessing's spawn (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            if b"spawn_main" in cmdline:
                pids.append(int(child))
    return pids


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_engine_process_death_is_answered_not_hung(long_llama: Path, tmp_path: Path) -> None:
    srv = start_server(long_llama, tmp_path / "server.log", "--engine-mode", "process")
    try:
        model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        payload = {"model": model, "prompt": [7], "max_tokens": 2000, "ignore_eos": True, "stream": True}
        t, chunks, started = stream_in_background(srv.url, payload)
        assert started.wait(30)
        (engine_pid,) = engine_pids(srv.proc.pid)
        os.kill(engine_pid, signal.SIGKILL)
        t.join(30)
        assert not t.is_alive()
        assert chunks[-1] == "[DONE]" and "error" in json.loads(chunks[-2])
        deadline = time.monotonic() + 10
        while httpx.get(srv.url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        r = httpx.post(srv.url + "/v1/completions", json={"model": model, "prompt": "hi"}, timeout=30)
        assert r.status_code == 503 and "restart" in r.json()["error"]["message"]
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(30) == 0, srv.log_tail()
    finally:
        srv.stop()
