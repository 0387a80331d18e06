"""SSE framing and response shapes, in process against the fake engine (the real engine is in test_e2e_*)."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from inferforge.serve.openai.app import create_app
from inferforge.serve.openai.limits import ServerLimits

from .fake_engine import FakeEngine

AUTH = {"Authorization": "Bearer k1"}


@pytest.fixture()
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture()
def client(engine: FakeEngine) -> TestClient:
    app = create_app(engine, limits=ServerLimits(max_body_bytes=2048), api_keys={"k1", "k2"})
    return TestClient(app)


def events(text: str) -> list[str]:
    assert text.endswith("\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks)
    return [b[len("data: ") :] for b in blocks]


def test_completion_stream_frames_chunks_usage_and_done(client: TestClient, engine: FakeEngine) -> None:
    body = {
        "model": "fake",
        "prompt": ["ab", "c"],
        "n": 2,
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    r = client.post("/v1/completions", json=body, headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    data = events(r.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 12,
        "total_tokens": 15,
    }
    assert all(c["usage"] is None for c in chunks[:-1])
    texts: dict[int, str] = {}
    for c in chunks[:-1]:
        (choice,) = c["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    expected = {
        p * 2 + s: "".join(engine.decode([engine.next_token(k, s)]) for k in range(3))
        for p in range(2)
        for s in range(2)
    }
    assert texts == expected


def test_chat_stream_starts_with_role_and_ends_with_finish_reason(client: TestClient) -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True}
    chunks = [
        json.loads(d) for d in events(client.post("/v1/chat/completions", json=body, headers=AUTH).text)[:-1]
    ]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all("usage" not in c for c in chunks)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_non_stream_logprobs_shapes_and_timing_headers(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/v1/completions",
        json={"model": "fake", "prompt": "ab", "max_tokens": 3, "logprobs": 2},
        headers=AUTH,
    )
    assert r.status_code == 200
    for h in ("queue", "ttft", "e2e"):
        assert float(r.headers[f"x-inferforge-{h}-ms"]) >= 0.0
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert lp["text_offset"] == [0, 1, 2]
    assert all(len(t) == 2 for t in lp["top_logprobs"])
    r = client.post(
        "/v1/chat/completions",
        headers=AUTH,
        json={
            "model": "fake",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 3,
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 2
    assert content[0]["bytes"] == list(content[0]["token"].encode())
    assert len(content[0]["top_logprobs"]) == 3


def test_auth_body_cap_and_error_shape(client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer k2"}).status_code == 200
    r = client.post("/v1/completions", headers=AUTH, json={"model": "fake", "prompt": "x" * 4000})
    assert r.status_code == 413 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/completions", headers={**AUTH, "content-type": "application/json"}, content=b"{nope")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/completions", headers=AUTH, json={"model": "fake", "prompt": "a", "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"


@pytest.mark.parametrize("per_key", [True, False])
def test_cache_salt_names_the_key_by_digest_when_scoped_per_key(engine: FakeEngine, per_key: bool) -> None:
    app = create_app(engine, api_keys={"k1", "k2"}, prefix_cache_per_key=per_key)
    client = TestClient(app)
    body = {"model": "fake", "prompt": "ab", "max_tokens": 1}
    for key, extra in (("k1", {}), ("k1", {}), ("k2", {}), ("k1", {"cache_salt": "mine"})):
        r = client.post("/v1/completions", json={**body, **extra}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200, r.text
    salts = [req.cache_salt for req in engine.seen]
    if not per_key:
        assert salts == [None, None, None, "mine"]
        return
    assert all(s is not None and s.startswith("key:") for s in salts)
    assert salts[0] == salts[1] != salts[2]  # one salt per key
    assert salts[3] == f"{salts[0]}|mine"  # the request's own salt after its key's
    assert not any("k1" in s or "k2" in s for s in salts)  # a digest, never the key
