"""The real server in a subprocess, driven by the official `openai` client.

Completions and chat, stream and not, usage, logprobs shapes, n, stop strings, seeds, timing headers, metrics
and the load-test CLI. Greedy output is compared with the engine's own output for the same prompt, computed
here in-process without HTTP."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from .server_proc import CLI_MODULE, EXTRA_ARGS, ServerProc, start_server

PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def server(
    tiny_llama: Path, key_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProc]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(tiny_llama, log, "--api-key-file", str(key_file), "--max-logprobs", "5")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server: ServerProc) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-1", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def engine(tiny_llama: Path):  # -> LLMEngine
    from inferforge.llm.engine import EngineConfig, LLMEngine

    return LLMEngine(tiny_llama, EngineConfig(device="cpu"))


@pytest.fixture(scope="module")
def reference(engine) -> dict:
    """The engine's own greedy output for PROMPT (24 tokens), without any HTTP in between."""
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    eng = engine
    ids = tuple(eng.tokenizer.encode(PROMPT))
    out = eng.generate([EngineRequest("ref", ids, SamplingParams(max_tokens=24, temperature=0.0))])["ref"][0]
    return {
        "prompt_ids": ids,
        "text": "".join(o.new_text for o in out),
        "tokens": out[-1].completion_tokens,
        "finish_reason": out[-1].finish_reason,
    }


def test_startup_log_names_the_engine_s_kernels(server: ServerProc, client: openai.OpenAI) -> None:
    client.models.list()  # the server is up, so the engine has been built and has said what it runs
    assert "device cpu, decode attention torch" in server.log.read_text(errors="replace")


def test_models_lists_the_served_model(client: openai.OpenAI, tiny_llama: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_llama.name]


def test_greedy_completion_equals_engine_output(client: openai.OpenAI, model: str, reference: dict) -> None:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    assert r.choices[0].text == reference["text"]
    assert r.choices[0].finish_reason == reference["finish_reason"]
    assert r.usage.prompt_tokens == len(reference["prompt_ids"])
    assert r.usage.completion_tokens == reference["tokens"]
    by_ids = client.completions.create(
        model=model, prompt=list(reference["prompt_ids"]), max_tokens=24, temperature=0
    )
    assert by_ids.choices[0].text == reference["text"]
    chunks = list(
        client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == reference["text"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == reference["tokens"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == reference["finish_reason"]


def test_chat_stream_agrees_with_non_stream(client: openai.OpenAI, model: str) -> None:
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
    ]
    full = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    assert full.object == "chat.completion" and full.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=msgs,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].choices == []
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    assert all(c.usage is None for c in chunks[:-1])
    no_usage = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=3, stream=True))
    assert all(c.choices for c in no_usage)


def test_completion_logprobs_shape(client: openai.OpenAI, model: str) -> None:
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    n = r.usage.completion_tokens
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(top) <= 3 and chosen <= 0.0
        assert math.isclose(chosen, max(top.values()), abs_tol=1e-4)  # greedy picks the most likely token


def test_chat_logprobs_shape(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=4,
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == 4
        assert math.isclose(entry.logprob, entry.top_logprobs[0].logprob, abs_tol=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            (t.logprob for t in entry.top_logprobs), reverse=True
        )


def test_n_and_prompt_lists(client: openai.OpenAI, model: str, engine) -> None:
    r = client.completions.create(
        model=model, prompt=["Hello", "A longer prompt here"], n=2, max_tokens=5, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert 4 <= r.usage.completion_tokens <= 20
    assert r.usage.prompt_tokens == sum(
        len(engine.tokenizer.encode(p)) for p in ["Hello", "A longer prompt here"]
    )
    chat = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=6, temperature=1.0, seed=5
    )
    assert sorted(c.index for c in chat.choices) == [0, 1, 2]
    streamed = list(
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Hi"}],
            n=3,
            max_tokens=6,
            temperature=1.0,
            seed=5,
            stream=True,
        )
    )
    texts = ["", "", ""]
    for c in streamed:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == [c.message.content for c in sorted(chat.choices, key=lambda c: c.index)]


def test_stop_string_truncates(client: openai.OpenAI, model: str, reference: dict, engine) -> None:
    """The server finds stop strings itself (its HTTP process makes the text); text, token count, logprobs and
    finish reason equal the engine's own stop, streamed or not, with and without min_tokens."""
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    text = reference["text"]
    start = next(
        i for i in range(4, len(text) - 3) if "\ufffd" not in text[i : i + 3] and text[i : i + 3].strip()
    )
    stop = text[start : start + 3]
    for min_tokens in (0, 20):
        params = SamplingParams(max_tokens=24, temperature=0.0, stop=(stop, "\x00"), min_tokens=min_tokens)
        outs = engine.generate([EngineRequest("s", reference["prompt_ids"], params)])["s"][0]
        want = "".join(o.new_text for o in outs)
        kw = {"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0, "stop": [stop, "\x00"],
              "extra_body": {"min_tokens": min_tokens}, "logprobs": 0}  # fmt: skip
        r = client.completions.create(**kw)
        assert r.choices[0].text == want
        assert r.choices[0].finish_reason == outs[-1].finish_reason
        assert r.usage.completion_tokens == outs[-1].completion_tokens
        assert len(r.choices[0].logprobs.tokens) == outs[-1].completion_tokens
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == want
        assert chunks[-1].usage.completion_tokens == outs[-1].completion_tokens
        if min_tokens == 0:
            assert want == text[: text.find(stop)] and outs[-1].finish_reason == "stop"


def _metric(server: ServerProc, name: str) -> float:
    """One sample of the server's /metrics, read now."""
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-test-1"}).text
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    return samples[name]


def _engine_generated(server: ServerProc) -> float:
    return _metric(server, "inferforge_llm_engine_generated_tokens_total")


def test_stop_string_with_n_ends_each_sequence_as_the_engine_does(
    client: openai.OpenAI, model: str, reference: dict, engine, server: ServerProc
) -> None:
    """n = 3 with a stop string found in some sequences: the server (which makes the text and tells the
    engine to stop one sequence) gives each choice the engine's own text and finish reason, streamed or
    not, and the engine stops generating a stopped sequence (a step or two in flight aside)."""
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=11, n=3)
    first = "".join(
        o.new_text for o in engine.generate([EngineRequest("a", reference["prompt_ids"], sampled)])["a"][0]
    )
    i = next(
        i for i in range(6, len(first) - 2) if "\ufffd" not in first[i : i + 2] and first[i : i + 2].strip()
    )
    stop = first[i : i + 2]
    outs = engine.generate([EngineRequest("b", reference["prompt_ids"], replace(sampled, stop=(stop,)))])["b"]
    want = {j: ("".join(o.new_text for o in seq), seq[-1].finish_reason) for j, seq in enumerate(outs)}
    assert want[0][1] == "stop"
    kw = {"model": model, "prompt": PROMPT, "n": 3, "max_tokens": 24, "temperature": 1.0, "seed": 11,
          "stop": [stop]}  # fmt: skip
    before = _engine_generated(server)
    r = client.completions.create(**kw)
    assert {c.index: (c.text, c.finish_reason) for c in r.choices} == want
    assert r.usage.completion_tokens == sum(seq[-1].completion_tokens for seq in outs)
    stopped = sum(reason == "stop" for _, reason in want.values())
    assert _engine_generated(server) - before <= r.usage.completion_tokens + 3 * stopped
    streamed: dict[int, list] = {j: ["", None] for j in range(3)}
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            streamed[c.index][0] += c.text
            streamed[c.index][1] = c.finish_reason or streamed[c.index][1]
    assert {j: tuple(v) for j, v in streamed.items()} == want


def test_presence_and_frequency_penalties_reach_the_engine(
    client: openai.OpenAI, model: str, engine, reference: dict
) -> None:
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0.0, presence_penalty=0.6, frequency_penalty=1.1)
    outs = engine.generate([EngineRequest("pf", reference["prompt_ids"], params)])["pf"][0]
    want = "".join(o.new_text for o in outs)
    assert want != reference["text"]  # the penalties change this output
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0,
                                  presence_penalty=0.6, frequency_penalty=1.1)  # fmt: skip
    assert r.choices[0].text == want


def test_logit_bias_forces_a_token(client: openai.OpenAI, model: str, engine, reference: dict) -> None:
    forced = reference["prompt_ids"][0]
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                  logit_bias={str(forced): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].text == engine.tokenizer.decode([forced] * 6)
    assert r.usage.completion_tokens == 6


def test_the_sdk_parse_helper_gets_its_pydantic_object(client: openai.OpenAI, model: str) -> None:
    """`client.chat.completions.parse(response_format=<pydantic model>)` sends a strict JSON schema with
    `$defs` and `$ref`; the answer must validate as that model."""
    import pydantic

    class Pet(pydantic.BaseModel):
        kind: str = pydantic.Field(max_length=5)
        legs: int = pydantic.Field(ge=0, le=8)

    class Owner(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=6)
        pets: list[Pet] = pydantic.Field(max_length=2)

    messages = [{"role": "user", "content": "An owner and pets, as JSON"}]
    r = client.chat.completions.parse(model=model, messages=messages, response_format=Owner, max_tokens=120,
                                      seed=5)  # fmt: skip
    owner = r.choices[0].message.parsed
    assert isinstance(owner, Owner) and all(isinstance(p, Pet) for p in owner.pets)


def test_forced_tool_calls_through_the_openai_client(client: openai.OpenAI, model: str) -> None:
    """Random weights: only the forced constraint makes the calls parse and name the right functions."""
    weather = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
               "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "weather", "parameters": weather}},
             {"type": "function", "function": {"name": "clock", "parameters": {
                 "type": "object", "properties": {}, "additionalProperties": False}}}]  # fmt: skip
    messages = [{"role": "user", "content": "Weather in Oslo for 3 days?"}]
    named = {"type": "function", "function": {"name": "weather"}}
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=named,
                                       max_tokens=60, seed=1)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "weather" and set(args) == {"city", "days"} and 1 <= args["days"] <= 7
    assert r.choices[0].message.content is None and r.choices[0].finish_reason == "stop"
    r = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=60, seed=2)  # fmt: skip
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name in {"weather", "clock"} and r.choices[0].finish_reason == "tool_calls"
    json.loads(call.function.arguments)
    stream = client.chat.completions.create(model=model, messages=messages, tools=tools, tool_choice=named,
                                            max_tokens=60, seed=1, stream=True)  # fmt: skip
    deltas = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "weather" and all(d.function.name is None for d in deltas[1:])
    assert len(deltas) > 2 and json.loads("".join(d.function.arguments or "" for d in deltas)) == args
    # the client's own accumulation of the streamed pieces (its stream helper) gives the same call
    kw = {
        "tools": tools,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": 60,
        "seed": 2,
    }
    with client.chat.completions.stream(model=model, messages=messages, **kw) as helper:
        final = helper.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls
    assert streamed.function.name == call.function.name  # the arguments as written: the same values
    assert json.loads(streamed.function.arguments) == json.loads(call.function.arguments)
    assert final.choices[0].finish_reason == "tool_calls"
    # a conversation that carries the call and its answer back renders and runs
    history = [*messages, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 3}'}]  # fmt: skip
    r = client.chat.completions.create(
        model=model, messages=history, tools=tools, tool_choice="none", max_tokens=4
    )
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, tools=tools, max_tokens=4)  # auto
    assert info.value.body["param"] == "tool_choice"


def test_echo_with_logprobs_scores_the_prompt(client: openai.OpenAI, model: str, engine, reference: dict):
    """lm-evaluation-harness's loglikelihood request: every prompt token's logprob, the first one null."""
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    ids = reference["prompt_ids"]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=2)
    want = engine.generate([EngineRequest("pl", ids, params)])["pl"][0][0].prompt_logprobs
    for stream in (False, True):
        kw = {"model": model, "prompt": PROMPT, "max_tokens": 1, "temperature": 0, "echo": True,
              "logprobs": 2}  # fmt: skip
        if stream:
            chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
            lp, text = chunks[0].choices[0].logprobs, "".join(c.choices[0].text for c in chunks)
        else:
            r = client.completions.create(**kw)
            lp, text = r.choices[0].logprobs, r.choices[0].text
        assert text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 1
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        got = lp.token_logprobs[1 : len(ids)]
        assert got == pytest.approx([t.logprob for t in want], abs=1e-5)
        assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # max_tokens 0: the prompt and its logprobs only (OpenAI's legacy scoring form)
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 0, "echo": True, "logprobs": 1}
    r = client.completions.create(**kw)
    (choice,) = r.choices
    assert choice.text == PROMPT and choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == len(ids) and choice.logprobs.token_logprobs[1:] == pytest.approx(
        [t.logprob for t in want], abs=1e-5
    )
    (chunk,) = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    assert chunk.choices[0].text == PROMPT and len(chunk.choices[0].logprobs.tokens) == len(ids)


PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 6}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_structured_outputs_through_the_openai_client(client: openai.OpenAI, model: str) -> None:
    """The tiny model's weights are random: only the constraint can make its output parse."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "A person, as JSON"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=3,
                                       response_format=fmt)  # fmt: skip
    person = json.loads(r.choices[0].message.content)
    assert set(person) == {"name", "age"} and isinstance(person["age"], int) and len(person["name"]) <= 6
    assert r.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=60, seed=3,
                                                 response_format=fmt, stream=True))  # fmt: skip
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == r.choices[0].message.content
    colours = ["red", "green", "blue"]
    c = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, n=3, seed=1,
                                  extra_body={"structured_outputs": {"choice": colours}})  # fmt: skip
    assert {ch.text for ch in c.choices} <= set(colours)
    bad = {"type": "json_schema", "json_schema": {"name": "x"}}  # no schema
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=messages, max_tokens=8, response_format=bad)
    assert info.value.body["param"] == "response_format"


def test_continuous_usage_stats_put_the_counts_in_every_chunk(client: openai.OpenAI, model: str) -> None:
    for route in ("completions", "chat"):
        kw = {"model": model, "max_tokens": 12, "temperature": 0, "stream": True,
              "extra_body": {"ignore_eos": True},
              "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
        if route == "chat":
            chunks = list(client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw))
        else:
            chunks = list(client.completions.create(prompt=PROMPT, **kw))
        counts = [c.usage.completion_tokens for c in chunks]
        assert all(c.usage is not None and c.usage.prompt_tokens > 0 for c in chunks)
        # the chat stream's first chunk is the role, before any token; a completion's first carries the
        # first token, or several where a slow reader's deltas were merged (`merge_outputs`; a loaded CI box)
        first_ok = counts[0] == 0 if route == "chat" else 1 <= counts[0] < 12
        assert counts == sorted(counts) and counts[-1] == 12 and first_ok
        assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_tokenize_and_detokenize(server: ServerProc, model: str, reference: dict) -> None:
    headers = {"Authorization": "Bearer sk-test-1"}
    r = httpx.post(server.url + "/tokenize", json={"model": model, "prompt": PROMPT}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == list(reference["prompt_ids"]) and body["count"] == len(reference["prompt_ids"])
    detok = {"model": model, "tokens": body["tokens"]}
    back = httpx.post(server.url + "/detokenize", json=detok, headers=headers)
    assert back.status_code == 200 and PROMPT in back.json()["prompt"]
    chat = httpx.post(server.url + "/tokenize", headers=headers,
                      json={"model": model, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert chat.status_code == 200 and chat.json()["count"] > 1
    for path, payload, param in [
        ("/tokenize", {"model": model}, "prompt"),
        ("/tokenize", {"model": "other", "prompt": "x"}, "model"),
        ("/detokenize", {"model": model, "tokens": [10**7]}, "tokens"),
    ]:
        bad = httpx.post(server.url + path, json=payload, headers=headers)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param
    assert httpx.post(server.url + "/tokenize", json={"prompt": "x"}).status_code == 401  # keys apply


def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        return (
            client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_timing_headers_and_metrics(client: openai.OpenAI, model: str, server: ServerProc) -> None:
    raw = client.completions.with_raw_response.create(model=model, prompt=PROMPT, max_tokens=8)
    for span in ("queue", "prefill", "ttft", "decode", "e2e"):
        assert float(raw.headers[f"x-inferforge-{span}-ms"]) >= 0.0
    assert float(raw.headers["x-inferforge-e2e-ms"]) >= float(raw.headers["x-inferforge-ttft-ms"])
    text = httpx.get(server.url + "/metrics", headers={"Authorization": "Bearer sk-test-1"}).text
    samples = {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}
    for h in (
        "time_to_first_token_seconds",
        "inter_token_latency_seconds",
        "queue_time_seconds",
        "prefill_time_seconds",
        "decode_time_seconds",
        "e2e_request_latency_seconds",
        "request_generated_tokens_per_second",
    ):
        assert samples[f"inferforge_llm_{h}_count"] > 0, h
    assert samples["inferforge_llm_generation_tokens_total"] >= 8
    assert "inferforge_llm_prefix_cache_hit_tokens_total" in samples
    assert samples["inferforge_llm_num_preemptions_total"] == 0.0  # the cache is far larger than the load
    assert "inferforge_llm_recomputed_tokens_total" in samples
    assert samples["inferforge_llm_spec_decode_draft_tokens_total"] == 0.0  # speculation is off by default
    if "thread" not in EXTRA_ARGS:  # the process engine (the default) reports its loop by phase
        loop = {
            s.labels["phase"]: s.value
            for fam in text_string_to_metric_families(text)
            if fam.name == "inferforge_llm_engine_loop_seconds"
            for s in fam.samples
            if s.name.endswith("_total")
        }
        assert loop["step"] > 0 and loop["ipc_out"] > 0 and set(loop) == {"step", "ipc_in", "ipc_out", "idle"}
    assert samples["inferforge_llm_kv_cache_usage_ratio"] == 0.0  # idle: every block free again
    assert "inferforge_llm_num_requests_waiting" in samples
    families = {f.name: f for f in text_string_to_metric_families(text)}
    by_label = {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["inferforge_llm_requests"].samples
        if s.name.endswith("_total")
    }
    assert by_label[("/v1/completions", "200")] >= 1


def test_loadtest_cli(server: ServerProc, key_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "load.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            CLI_MODULE,
            "loadtest-llm",
            server.url,
            "--concurrency",
            "4",
            "--requests",
            "8",
            "--max-tokens",
            "6",
            "--prompt-len",
            "12",
            "--ignore-eos",
            "--api-key-file",
            str(key_file),
            "--json-out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert (report["ok"], report["errors"], report["generated_tokens"]) == (8, 0, 48)
    assert report["ttft_ms"]["p50"] > 0 and report["itl_ms"]["p50"] > 0
    assert "tok/s" in proc.stdout


def _prefix_hits(server: ServerProc) -> float:
    return _metric(server, "inferforge_llm_prefix_cache_hit_tokens_total")


def test_prefix_caching_is_on_and_cache_salt_keeps_prompts_apart(
    client: openai.OpenAI, model: str, server: ServerProc
) -> None:
    """A prompt of several 16-token blocks sent twice reads its blocks from the cache the second time; with a
    `cache_salt` it reads none the first time (no other request used that salt) and its own the second."""
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 8)
    salt = f"tenant-{uuid.uuid4().hex}"
    for body in (None, {"cache_salt": salt}):
        before = _prefix_hits(server)
        first = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0,
                                          extra_body=body)  # fmt: skip
        middle = _prefix_hits(server)
        second = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0,
                                           extra_body=body)  # fmt: skip
        after = _prefix_hits(server)
        if body is not None:
            assert middle == before  # a new salt shares nothing with the unsalted prompt sent just before
        assert after - middle >= 16
        assert first.choices[0].text == second.choices[0].text
    with pytest.raises(openai.BadRequestError, match="cache_salt"):
        client.completions.create(model=model, prompt=prompt, max_tokens=4, extra_body={"cache_salt": ""})


def test_prefix_cache_is_scoped_per_api_key(client: openai.OpenAI, model: str, server: ServerProc) -> None:
    """The same prompt from a second key reads nothing cached by the first (`--prefix-cache-per-key`, on by
    default), then its own blocks; the texts agree."""
    other = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-test-2", max_retries=0, timeout=60)
    prompt = " ".join(["a lazy dog sleeps under the quick brown fox"] * 8)
    texts = []
    for c in (client, client, other, other):
        before = _prefix_hits(server)
        texts.append(c.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0.0))
        texts[-1] = (texts[-1].choices[0].text, _prefix_hits(server) - before)
    assert texts[0][1] == 0 and texts[1][1] >= 16  # the first key: computed, then read from the cache
    assert texts[2][1] == 0 and texts[3][1] >= 16  # the second key: its own, not the first key's
    assert len({t for t, _ in texts}) == 1
