"""`serve-llm --engine-mode thread`: the engine steps in a thread of the server (`AsyncLLMEngine`) instead of
the default child process. Same answers as the engine itself, disconnects free the slot, a full queue is 429,
SIGTERM drains and exits 0."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .server_proc import ServerProc, start_server, stream_in_background
from .test_e2e_lifecycle import LONG, Holder, body, settle, wait_for


@pytest.fixture(scope="module")
def server(long_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProc]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(
        long_llama,
        log,
        "--engine-mode",
        "thread",
        "--max-num-seqs",
        "1",
        "--max-waiting",
        "1",
        "--drain-timeout",
        "30",
    )
    yield srv
    srv.stop()


def test_greedy_equals_the_engine(server: ServerProc, long_llama: Path) -> None:
    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    eng = LLMEngine(long_llama, EngineConfig(device="cpu"))
    ids = tuple(eng.tokenizer.encode("Hello there"))
    ref = eng.generate([EngineRequest("r", ids, SamplingParams(max_tokens=20, temperature=0.0))])["r"][0]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt="Hello there", max_tokens=20, temperature=0)
    assert r.choices[0].text == "".join(o.new_text for o in ref)
    assert r.usage.completion_tokens == ref[-1].completion_tokens


def test_disconnect_frees_slot_and_full_queue_is_429(server: ServerProc) -> None:
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    before = settle(server.url)
    holder = Holder(server.url, model)
    try:
        wait_for(server.url, "running", 1)
        outcome: list[int] = []
        queued = threading.Thread(
            target=lambda: outcome.append(
                httpx.post(
                    server.url + "/v1/completions", json=body(model, 4, stream=False), timeout=60
                ).status_code
            )
        )
        queued.start()
        wait_for(server.url, "waiting", 1)
        r = httpx.post(server.url + "/v1/completions", json=body(model, 4, stream=False), timeout=30)
        assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
    finally:
        holder.close()  # disconnect mid-stream: the queued request gets the slot
    queued.join(60)
    assert outcome == [200]
    after = settle(server.url)
    assert after["kv_blocks_used"] == 0
    assert after["generated_tokens_total"] - before["generated_tokens_total"] < LONG


def test_sigterm_drains_an_inflight_stream(server: ServerProc) -> None:
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    payload = {**body(model, 300), "stream_options": {"include_usage": True}}
    t, chunks, started = stream_in_background(server.url, payload)
    assert started.wait(30)
    server.proc.send_signal(signal.SIGTERM)
    t.join(60)
    assert server.proc.wait(30) == 0, server.log_tail()
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["usage"]["completion_tokens"] == 300
