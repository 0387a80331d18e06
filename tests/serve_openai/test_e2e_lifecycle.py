"""Client disconnects and SIGTERM drain against the real server (one running slot, so queueing is visible)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .server_proc import CLI_MODULE, ServerProc, start_server, stream_in_background

LONG = 2000  # tokens: seconds of CPU decoding, so the tests act while the request surely runs


@pytest.fixture(scope="module")
def server(long_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    srv = start_server(
        long_llama, tmp_path_factory.mktemp("log") / "server.log", "--max-num-seqs", "1", "--max-waiting", "1"
    )
    yield srv
    srv.stop()


def body(model: str, max_tokens: int, stream: bool = True) -> dict:
    return {
        "model": model,
        "prompt": [7],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        "temperature": 0,
    }


def stats(url: str) -> dict:
    return httpx.get(url + "/v1/stats").json()


def settle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = stats(url)
        if s["running"] == 0 and s["waiting"] == 0:
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine still busy after {timeout}s: {stats(url)}")


@pytest.fixture(scope="module")
def model(server: ServerProc) -> str:
    return httpx.get(server.url + "/v1/models").json()["data"][0]["id"]


def test_disconnect_mid_stream_frees_the_slot(server: ServerProc, model: str) -> None:
    before = settle(server.url)
    with (
        httpx.Client(base_url=server.url, timeout=30) as c,
        c.stream("POST", "/v1/completions", json=body(model, LONG)) as r,
    ):
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["choices"][0]["text"] is not None
        assert stats(server.url)["running"] == 1
    after = settle(server.url)  # leaving the `with` closed the connection mid-stream
    assert after["kv_blocks_used"] == 0
    generated = after["generated_tokens_total"] - before["generated_tokens_total"]
    assert 1 <= generated < LONG, generated  # it stopped early: the abort reached the engine
    time.sleep(0.2)
    assert stats(server.url)["generated_tokens_total"] == after["generated_tokens_total"]
    # the freed slot serves the next request at once
    r = httpx.post(server.url + "/v1/completions", json=body(model, 4, stream=False), timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4


def wait_for(url: str, key: str, value: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while stats(url)[key] != value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {stats(url)}"
        time.sleep(0.005)


class Holder:
    """A long streaming request that keeps the only running slot busy until closed."""

    def __init__(self, url: str, model: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60)
        self.cm = self.client.stream("POST", "/v1/completions", json=body(model, LONG))
        self.cm.__enter__()

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def aborted_total(url: str) -> float:
    lines = [
        ln
        for ln in httpx.get(url + "/metrics").text.splitlines()
        if ln.startswith("inferforge_llm_aborted_requests_total")
    ]
    return float(lines[0].split()[-1])


def test_disconnect_while_queued_leaves_the_queue(server: ServerProc, model: str) -> None:
    settle(server.url)
    aborted = aborted_total(server.url)
    holder = Holder(server.url, model)
    try:
        wait_for(server.url, "running", 1)
        for stream in (True, False):  # a queued request whose client gives up before its first token
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(server.url + "/v1/completions", json=body(model, LONG, stream=stream), timeout=0.3)
            wait_for(server.url, "waiting", 0)  # gone from the queue while the slot is still busy
            assert stats(server.url)["running"] == 1
    finally:
        holder.close()
    assert settle(server.url)["kv_blocks_used"] == 0
    assert aborted_total(server.url) == aborted + 3


def test_full_queue_is_429(server: ServerProc, model: str) -> None:
    settle(server.url)
    holder = Holder(server.url, model)
    outcome: list[str] = []

    def wait_in_queue_then_give_up() -> None:
        try:
            httpx.post(server.url + "/v1/completions", json=body(model, LONG, stream=False), timeout=1.5)
            outcome.append("answered")
        except httpx.ReadTimeout:
            outcome.append("gave up")

    queued = threading.Thread(target=wait_in_queue_then_give_up)
    try:
        wait_for(server.url, "running", 1)
        queued.start()
        wait_for(server.url, "waiting", 1)
        r = httpx.post(server.url + "/v1/completions", json=body(model, 4, stream=False), timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
        assert "capacity" in r.json()["error"]["message"]
    finally:
        holder.close()
        queued.join(30)
    assert outcome == ["gave up"]
    settle(server.url)


@pytest.mark.parametrize(("drain", "finish"), [("30", "length"), ("0", "abort")])
def test_sigterm_drains_then_exits_zero(long_llama: Path, tmp_path: Path, drain: str, finish: str) -> None:
    srv = start_server(long_llama, tmp_path / "server.log", "--drain-timeout", drain)
    try:
        model = httpx.get(srv.url + "/v1/models").json()["data"][0]["id"]
        n = 400 if finish == "length" else LONG  # drained in full: long enough to be in flight, short to wait
        t, chunks, started = stream_in_background(
            srv.url, {**body(model, n), "stream_options": {"include_usage": True}}
        )
        assert started.wait(30)
        srv.proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert srv.proc.wait(30) == 0, srv.log_tail()
        assert chunks[-1] == "[DONE]"
        finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, chunks[:-1]) if c["choices"]]
        assert finishes[-1] == finish
        usage = json.loads(chunks[-2])["usage"]
        if finish == "length":  # drained: the in-flight request completed in full
            assert usage["completion_tokens"] == n
        else:  # no grace: aborted at once, but still a well-formed stream
            assert usage["completion_tokens"] < LONG
        with pytest.raises(httpx.ConnectError):
            httpx.get(srv.url + "/health", timeout=2)
    finally:
        srv.stop()


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["/no/such/dir"], "MODEL_DIR"),
        (["{model}", "--api-key-file", "/no/such/keys"], "--api-key-file"),
        (["{model}", "--max-n", "0"], "--max-n"),
        (["{model}", "--drain-timeout", "-1"], "--drain-timeout"),
        (["{model}", "--admit-delay-steps", "-1"], "--admit-delay-steps"),
        (["{model}", "--max-num-batched-tokens", "0"], "--max-num-batched-tokens"),
        (["{model}", "--api-server-count", "-1"], "--api-server-count"),
        (["{model}", "--prefill-graph-tokens", "128,big"], "--prefill-graph-tokens"),
        (["{model}", "--prefill-graph-tokens", "0,128"], "--prefill-graph-tokens"),
        (["{model}", "--api-server-count", "2", "--engine-mode", "thread"], "--api-server-count"),
    ],
)
def test_bad_flags_give_one_line_naming_the_flag(tiny_llama: Path, args: list[str], flag: str) -> None:
    cmd = [
        sys.executable,
        "-m",
        CLI_MODULE,
        "serve-llm",
        *(a.format(model=tiny_llama) for a in args),
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert flag in proc.stderr and "Traceback" not in proc.stderr
