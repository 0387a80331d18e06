"""Every bad parameter of the issue, sent with the official `openai` client to the real server: the right 4xx
and a message naming the parameter. Also auth (401 on every route but /health) and unknown-field tolerance."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from .server_proc import ServerProc, start_server

CAP_TOKENS, CAP_N, CAP_LOGPROBS = 64, 4, 5


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(
        tiny_llama,
        log,
        "--api-key-file",
        str(key_file),
        "--max-tokens-cap",
        str(CAP_TOKENS),
        "--max-n",
        str(CAP_N),
        "--max-logprobs",
        str(CAP_LOGPROBS),
        "--max-model-len",
        "128",
    )
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-2", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


BAD_COMPLETIONS = [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"),
    ({"max_tokens": CAP_TOKENS + 1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": CAP_N + 1}, "n"),
    ({"logprobs": CAP_LOGPROBS + 1}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"prompt": [5] * 200}, "prompt"),  # longer than the 128-token context
    ({"prompt": [5] * 100, "max_tokens": 60}, "max_tokens"),  # fits alone, not with its completion
    ({"prompt": [1, 2, 10**6]}, "prompt"),  # token id outside the vocabulary
    ({"prompt": [[1, 2], [3, -4]]}, "prompt"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
]


@pytest.mark.parametrize(("override", "param"), BAD_COMPLETIONS)
def test_bad_completion_parameter_is_400_naming_it(
    client: openai.OpenAI, model: str, override: dict, param: str
) -> None:
    kwargs = {"model": model, "prompt": "hello", "max_tokens": 4, **override}
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(**kwargs)
    err = info.value.body
    assert info.value.status_code == 400
    assert err["param"] == param or err["param"].startswith(param), err
    assert param in err["message"] or err["param"] == param
    assert err["type"] == "invalid_request_error"


BAD_CHAT = [
    ({"max_tokens": -5}, "max_tokens"),
    ({"max_completion_tokens": 10**9}, "max_completion_tokens"),
    ({"n": CAP_N + 1}, "n"),
    ({"logprobs": True, "top_logprobs": CAP_LOGPROBS + 1}, "top_logprobs"),
    ({"temperature": 3.0}, "temperature"),
    ({"top_p": -1.0}, "top_p"),
    ({"messages": [{"role": "user", "content": "word " * 300}]}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize(("override", "param"), BAD_CHAT)
def test_bad_chat_parameter_is_400_naming_it(
    client: openai.OpenAI, model: str, override: dict, param: str
) -> None:
    kwargs = {"model": model, "messages": [{"role": "user", "content": "hi"}], **override}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kwargs)
    assert info.value.body["param"].startswith(param), info.value.body


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    assert info.value.body["code"] == "model_not_found" and "gpt-9" in info.value.body["message"]


def test_unknown_fields_are_tolerated(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(
        model=model,
        prompt="hi",
        max_tokens=3,
        temperature=0,
        extra_body={"a_field_from_the_future": {"x": [1, 2]}, "top_k": 5},
    )
    assert r.usage.completion_tokens >= 1


def test_api_keys_guard_every_route_but_health(server: ServerProc, model: str) -> None:
    assert httpx.get(server.url + "/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/stats"),
    ]:
        r = httpx.request(method, server.url + path, json={"model": model, "prompt": "x"})
        assert r.status_code == 401, path
        assert r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    other = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-1", max_retries=0)
    assert other.models.list().data[0].id == model


def test_oversized_body_is_413(server: ServerProc, model: str) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        headers={"Authorization": "Bearer sk-test-1"},
        json={"model": model, "prompt": "x" * (5 * 1024 * 1024)},
        timeout=30,
    )
    assert r.status_code == 413 and "bytes" in r.json()["error"]["message"]
