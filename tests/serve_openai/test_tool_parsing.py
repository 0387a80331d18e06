"""Tool calls read from the model's own text ("auto" with `--tool-call-parser hermes`): the parser, the
stream's hold-back of a possible tag, and both response shapes in process against a fake engine that writes
a scripted answer (the real engine's forced calls are in test_e2e_openai.py; random weights write no tags)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
from fastapi.testclient import TestClient

from inferforge.llm.protocol import EngineOutput, EngineRequest, RequestTiming
from inferforge.serve.openai.app import create_app
from inferforge.serve.openai.limits import ServerLimits
from inferforge.serve.openai.tool_stream import PartialCall, ToolCallStream, partial_calls
from inferforge.serve.openai.tools import AutoToolStream, ToolPlan, hermes_calls

from .fake_engine import FakeEngine

CALL = '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]


def test_hermes_blocks_become_calls_and_anything_else_stays_text() -> None:
    content, calls = hermes_calls("Let me look. " + CALL + CALL.replace("Oslo", "Rome"))
    assert content == "Let me look."
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Oslo", "Rome"]
    assert all(c["function"]["name"] == "weather" and c["id"].startswith("call_") for c in calls)
    assert hermes_calls(CALL)[0] is None
    for text in ("no calls here", "<tool_call>{not json}</tool_call>", '<tool_call>{"name": 1', "a < b"):
        assert hermes_calls(text) == (text, None)


@pytest.mark.parametrize("cut", [1, 3, 7, 11, 40])
def test_the_stream_holds_back_only_what_may_be_a_tag(cut: int) -> None:
    text = "x < y, so: " + CALL
    parts = [text[i : i + cut] for i in range(0, len(text), cut)]
    auto, sent = AutoToolStream(), ""
    for part in parts:
        sent += auto.feed(part)
        assert "<tool_call>"[:2] not in sent[len("x < y, so: ") :]  # nothing of the tag went out
    rest, calls = auto.finish()
    assert sent == "x < y, so: " and rest == "" and calls is not None
    plain = AutoToolStream()
    assert plain.feed("a <") == "a " and plain.feed("b") == "<b" and plain.finish() == ("", None)
    assert AutoToolStream().feed("end <tool_ca") == "end " and AutoToolStream().finish() == ("", None)


class ScriptedEngine(FakeEngine):
    """Writes `script` a character a token, then stops (finish_reason "stop")."""

    max_model_len = 512

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        t0 = time.monotonic()
        ids = self.encode(self.script)
        for step, tok in enumerate(ids):
            last = step == len(ids) - 1
            timing = RequestTiming(t0, t0, t0, t0 if last else None)
            reason = "stop" if last else None
            yield EngineOutput(request.request_id, 0, (tok,), self.decode([tok]), None, last, reason,
                               len(request.prompt_ids), step + 1, timing)  # fmt: skip


def _stream(client: TestClient, body: dict) -> list[dict]:
    text = client.post("/v1/chat/completions", json={**body, "stream": True}).text
    return [json.loads(b[6:]) for b in text.split("\n\n") if b.startswith("data: {")]


def accumulate_tool_calls(chunks: list[dict], choice: int = 0) -> list[dict]:
    """A choice's streamed tool calls put together as OpenAI's client does: by `index`, the id and name
    from a call's first delta, its arguments concatenated."""
    calls: dict[int, dict] = {}
    for c in chunks:
        for ch in c["choices"]:
            for tc in ch["delta"].get("tool_calls") or [] if ch["index"] == choice else []:
                call = calls.setdefault(tc["index"], {"id": None, "name": None, "arguments": ""})
                call["id"] = call["id"] or tc.get("id")
                call["name"] = call["name"] or tc["function"].get("name")
                call["arguments"] += tc["function"].get("arguments") or ""
    return [calls[k] for k in sorted(calls)]


BODY = {"model": "fake", "messages": [{"role": "user", "content": "w?"}], "tools": TOOLS, "max_tokens": 200}


def _client(script: str, parser: str | None = "hermes") -> TestClient:
    limits = ServerLimits(max_tokens_cap=256, tool_call_parser=parser)
    return TestClient(create_app(ScriptedEngine(script), limits=limits))


def test_auto_tool_calls_in_both_response_shapes() -> None:
    body = BODY
    client = _client("Sure. " + CALL)
    r = client.post("/v1/chat/completions", json=body).json()
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Sure."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Oslo"
    }
    chunks = _stream(client, body)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    (streamed,) = accumulate_tool_calls(chunks)
    assert content == "Sure. " and streamed["name"] == "weather" and streamed["id"].startswith("call_")
    assert json.loads(streamed["arguments"]) == {"city": "Oslo"}
    assert (
        sum(1 for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")) > 3
    )  # piecewise
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    plain = _client("No tool needed.").post("/v1/chat/completions", json=body).json()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "No tool needed.", "refusal": None}
    assert plain["finish_reason"] == "stop"


def test_auto_without_a_parser_is_refused() -> None:
    body = {"model": "fake", "messages": [{"role": "user", "content": "w?"}], "tools": TOOLS}
    r = _client("x", parser=None).post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert "--tool-call-parser hermes" in r.json()["error"]["message"]
    with pytest.raises(ValueError, match="tool_call_parser"):
        ServerLimits(tool_call_parser="pythonic")


LLAMA_CALL = '{"name": "weather", "parameters": {"city": "Oslo"}}'


def test_llama3_json_answers_become_calls_only_when_wholly_calls() -> None:
    from inferforge.serve.openai.tools import llama3_json_calls

    for text in (
        LLAMA_CALL,
        " <|python_tag|>" + LLAMA_CALL,
        LLAMA_CALL + "; " + LLAMA_CALL.replace("Oslo", "Rome"),
    ):
        content, calls = llama3_json_calls(text)
        assert content is None and calls and calls[0]["function"]["name"] == "weather"
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
    assert len(llama3_json_calls(LLAMA_CALL + ";" + LLAMA_CALL)[1]) == 2
    for text in ("It is sunny.", '{"city": "Oslo"}', LLAMA_CALL + " and then some", '{"name": "w", "param'):
        assert llama3_json_calls(text) == (text, None)


@pytest.mark.parametrize("cut", [1, 4, 9, 100])
def test_llama3_json_stream_holds_a_call_and_passes_text(cut: int) -> None:
    def run(text: str) -> tuple[str, list | None]:
        auto, sent = AutoToolStream("llama3_json"), ""
        for i in range(0, len(text), cut):
            sent += auto.feed(text[i : i + cut])
        rest, calls = auto.finish()
        return sent + rest, calls

    sent, calls = run("  " + LLAMA_CALL)
    assert sent == "" and [c["function"]["name"] for c in calls] == ["weather"]
    assert run("Sunny, 3 degrees. {not a call}") == ("Sunny, 3 degrees. {not a call}", None)
    assert run('{"unfinished": ') == ('{"unfinished": ', None)  # held, then given back as text


def test_llama3_json_auto_through_the_app() -> None:
    body = BODY
    client = _client(LLAMA_CALL, parser="llama3_json")
    (choice,) = client.post("/v1/chat/completions", json=body).json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "weather"
    (streamed,) = accumulate_tool_calls(_stream(client, body))
    assert streamed["name"] == "weather" and json.loads(streamed["arguments"]) == {"city": "Oslo"}


MISTRAL_LIST = (
    '[TOOL_CALLS][{"name": "weather", "arguments": {"city": "Oslo"}}, {"name": "clock", "arguments": {}}]'
)
MISTRAL_ARGS = '[TOOL_CALLS]weather[ARGS]{"city": "Oslo"}[TOOL_CALLS]clock[ARGS]{}'


def test_mistral_answers_in_both_tokenizer_generations() -> None:
    from inferforge.serve.openai.tools import mistral_calls

    for text in ("Sure. " + MISTRAL_LIST, MISTRAL_ARGS):
        content, calls = mistral_calls(text)
        assert [c["function"]["name"] for c in calls] == ["weather", "clock"]
        assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo"}
        assert content == ("Sure." if text.startswith("Sure") else None)
    for text in ("no calls", "[TOOL_CALLS][]", '[TOOL_CALLS][{"name": 1', "[TOOL_CALLS]w[ARGS]{oops"):
        assert mistral_calls(text) == (text, None)


def test_the_mistral_parser_keeps_special_tokens_in_the_request() -> None:
    """[TOOL_CALLS] is a control token, skipped by default: with this parser and tools the engine request
    keeps special tokens' text (vLLM's parser does the same); other requests keep the client's choice."""
    from inferforge.serve.openai.convert import plan_chat
    from inferforge.serve.openai.schemas import ChatCompletionRequest

    engine = ScriptedEngine("x")
    for parser, tools, asked, kept in (
        ("mistral", TOOLS, True, True),
        ("mistral", None, True, False),
        ("hermes", TOOLS, True, False),
        (None, None, False, True),
    ):
        body = {**BODY, "tools": tools, "skip_special_tokens": asked}
        if tools is None:
            body.pop("tools")
        limits = ServerLimits(max_tokens_cap=256, tool_call_parser=parser)
        plan = plan_chat(ChatCompletionRequest(**body), engine, limits, "fake")
        assert plan.requests[0].params.skip_special_tokens is not kept, (parser, tools, asked)


REQUIRED = '[{"name": "weather", "parameters": {"city": "Oslo, \\"NO\\"", "days": [1, {"a": "}]"}]}}, ' + (
    '{"name": "clock", "parameters": {}}]'
)


@pytest.mark.parametrize("cut", [1, 2, 5, 13, 1000])
@pytest.mark.parametrize(
    ("plan", "text"),
    [
        (ToolPlan("weather"), '{"city": "Oslo", "days": 3}'),
        (ToolPlan(None), REQUIRED),
        (ToolPlan(None, parser="hermes"), "Sure. " + CALL + "\n" + CALL.replace("Oslo", "Rome")),
        (ToolPlan(None, parser="llama3_json"), "<|python_tag|>" + LLAMA_CALL + "; " + LLAMA_CALL),
        (ToolPlan(None, parser="mistral"), "Sure. " + MISTRAL_LIST),
        (ToolPlan(None, parser="mistral"), MISTRAL_ARGS),
    ],
)
def test_streamed_calls_put_together_equal_the_whole_answer(plan: ToolPlan, text: str, cut: int) -> None:
    """Fed in pieces of every size, a stream's deltas rebuild exactly the calls that the unstreamed answer
    gives (names, and arguments that parse to the same values), each call's name in its first delta, and the
    content before the calls."""
    stream, content, deltas = ToolCallStream(plan), "", []
    for i in range(0, len(text), cut):
        sent, got = stream.feed(text[i : i + cut])
        content, deltas = content + sent, deltas + got
    rest, got = stream.finish()
    content, deltas = content + rest, deltas + got
    want_content, want = plan.answer(text)
    chunks = [{"choices": [{"index": 0, "delta": {"tool_calls": [d]}}]} for d in deltas]
    calls = accumulate_tool_calls(chunks)
    assert [c["name"] for c in calls] == [w["function"]["name"] for w in want]
    assert [json.loads(c["arguments"]) for c in calls] == [
        json.loads(w["function"]["arguments"]) for w in want
    ]
    assert all("name" in d["function"] for d in deltas if "id" in d) and len({c["id"] for c in calls}) == len(
        calls
    )
    assert content.strip() == (want_content or "")


def test_a_call_streams_its_arguments_before_they_are_complete() -> None:
    stream = ToolCallStream(ToolPlan(None, parser="hermes"))
    assert stream.feed('<tool_call>{"na') == ("", [])
    _, (first,) = stream.feed('me": "weather", "arguments": {"city": "Os')
    assert first["function"] == {"name": "weather", "arguments": '{"city": "Os'}
    assert first["type"] == "function"
    _, (more,) = stream.feed('lo"}}</tool_call>')
    assert more == {"index": 0, "function": {"arguments": 'lo"}'}}


def test_partial_calls_read_strings_and_nesting_as_json_does() -> None:
    (call,) = partial_calls('{"arguments": {"k": "a \\" } {"}, "name": "f"}')
    assert call.name == "f" and call.args_done and json.loads(call.args) == {"k": 'a " } {'}
    (call,) = partial_calls('{"name": "f", "arguments": "{\\"x\\": 1}"}')
    assert call.args == '{"x": 1}'  # arguments given as a JSON string: the string's text
    assert partial_calls('{"name": "f') == [PartialCall()] and partial_calls("no calls") == []


def test_an_auto_answer_that_names_no_call_ends_as_text() -> None:
    stream = ToolCallStream(ToolPlan(None, parser="hermes"))
    sent, deltas = stream.feed("Hi <tool_call>{broken")
    rest, more = stream.finish()
    assert (sent + rest, deltas + more, stream.started) == ("Hi <tool_call>{broken", [], False)


def test_a_required_answer_cut_before_its_first_name_ends_as_its_text() -> None:
    stream = ToolCallStream(ToolPlan(None))
    assert stream.feed('[{"name": "wea') == ("", [])
    assert stream.finish() == ('[{"name": "wea', []) and not stream.started
