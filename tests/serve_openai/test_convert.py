"""Request checks that need no engine run: caps, context length, vocabulary, unsupported features."""

from __future__ import annotations

import pytest

from inferforge.serve.openai.convert import plan_chat, plan_completion
from inferforge.serve.openai.errors import APIError
from inferforge.serve.openai.limits import ServerLimits
from inferforge.serve.openai.schemas import ChatCompletionRequest, CompletionRequest

from .fake_engine import FakeEngine

LIMITS = ServerLimits(max_tokens_cap=32, max_n=3, max_logprobs=4, max_prompts=2)


def completion(**kw: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "fake", "prompt": "hi", **kw})


def chat(**kw: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}], **kw}
    )


@pytest.mark.parametrize(
    ("kw", "status", "param"),
    [
        ({"model": "other"}, 404, "model"),
        ({"max_tokens": 33}, 400, "max_tokens"),
        ({"n": 4}, 400, "n"),
        ({"logprobs": 5}, 400, "logprobs"),
        ({"prompt": "x" * 64}, 400, "prompt"),
        ({"prompt": [1, 2, 257]}, 400, "prompt"),
        ({"prompt": ["a", "b", "c"]}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": "x" * 40, "max_tokens": 30}, 400, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"logit_bias": {"257": 1.0}}, 400, "logit_bias"),
        ({"min_tokens": 9, "max_tokens": 8}, 400, "min_tokens"),
        ({"logit_bias": {"five": 1.0}}, 400, "logit_bias"),
        ({"logit_bias": {"5": 100.5}}, 400, "logit_bias"),
        ({"logit_bias": {str(i): 1.0 for i in range(301)}}, 400, "logit_bias"),
    ],
)
def test_bad_completion_requests_name_their_param(kw: dict, status: int, param: str) -> None:
    with pytest.raises(APIError) as info:
        plan_completion(completion(**kw), FakeEngine(), LIMITS, "fake")
    assert info.value.status == status
    assert info.value.param == param
    assert info.value.body()["error"]["param"] == param


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 5}, "top_logprobs"),
        ({"max_completion_tokens": 40}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ],
)
def test_bad_chat_requests_name_their_param(kw: dict, param: str) -> None:
    with pytest.raises(APIError) as info:
        plan_chat(chat(**kw), FakeEngine(), LIMITS, "fake")
    assert (info.value.status, info.value.param) == (400, param)


def test_prompt_forms_become_one_engine_request_each() -> None:
    eng = FakeEngine()
    assert [r.prompt_ids for r in plan_completion(completion(prompt="ab"), eng, LIMITS, "fake").requests] == [
        tuple(eng.encode("ab"))
    ]
    plan = plan_completion(completion(prompt=[[5, 6], [7]], n=2, max_tokens=3), eng, LIMITS, "fake")
    assert [r.prompt_ids for r in plan.requests] == [(5, 6), (7,)]
    assert {r.params.n for r in plan.requests} == {2}
    assert len({r.request_id for r in plan.requests}) == 2


def test_defaults_fit_the_context() -> None:
    eng = FakeEngine()
    plan = plan_chat(chat(), eng, LIMITS, "fake")
    prompt_len = len(plan.requests[0].prompt_ids)
    assert plan.requests[0].params.max_tokens == min(LIMITS.max_tokens_cap, eng.max_model_len - prompt_len)
    assert plan_completion(completion(), eng, LIMITS, "fake").requests[0].params.max_tokens == 16


def test_unknown_fields_are_kept_not_rejected() -> None:
    req = completion(some_future_field={"x": 1}, top_k=-1)
    plan = plan_completion(req, FakeEngine(), LIMITS, "fake")
    assert plan.requests[0].params.top_k == 0


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="max_n"):
        ServerLimits(max_n=0)
    with pytest.raises(ValueError, match="max_logprobs"):
        ServerLimits(max_logprobs=21)


def test_engine_refusals_map_to_statuses_across_the_process_boundary() -> None:
    from inferforge.serve.openai.app import engine_error
    from inferforge.serve.openai.engine_process import EngineClosedError, EngineProcessError, _error

    assert engine_error(_error("QueueFullError", "waiting queue is full")).status == 429
    assert engine_error(_error("RequestTooLargeError", "too long")).status == 400
    assert engine_error(EngineClosedError("closing")).status == 503
    assert engine_error(EngineProcessError("the engine process is gone")).status == 503
    assert engine_error(RuntimeError("device fault")) is None  # a bug or a fault: 500, not the client's


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("kw", "kind", "spec"),
    [
        ({"response_format": {"type": "text"}}, None, None),
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}},
            "json_schema",
            SCHEMA,
        ),
        ({"structured_outputs": {"json": SCHEMA}}, "json_schema", SCHEMA),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, "choice", ["yes", "no"]),
        ({"structured_outputs": {"grammar": 'start: "a"+'}}, "grammar", 'start: "a"+'),
        ({"structured_outputs": {"json_object": True}}, "json_object", ""),
        ({"guided_json": SCHEMA}, "json_schema", SCHEMA),
        ({"guided_json": '{"type": "string"}'}, "json_schema", {"type": "string"}),
        ({"guided_choice": ["a", "b"]}, "choice", ["a", "b"]),
        ({"guided_regex": "a|b"}, "regex", "a|b"),
    ],
)
@pytest.mark.parametrize("route", ["completion", "chat"])
def test_structured_output_spellings_reach_the_engine(kw: dict, kind: str | None, spec, route: str) -> None:
    import json

    plan = (plan_chat(chat(**kw), FakeEngine(), LIMITS, "fake") if route == "chat"
            else plan_completion(completion(**kw), FakeEngine(), LIMITS, "fake"))  # fmt: skip
    got = plan.requests[0].params.structured
    if kind is None:
        assert got is None
        return
    assert got is not None and got.kind == kind
    assert (json.loads(got.spec) if kind in ("json_schema", "choice") else got.spec) == spec


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format", "not one of"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "needs"),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "frob"}},
                }
            },
            "response_format",
            "frob",
        ),
        ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "regex"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "not supported"),
        ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs", "does not compile"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_json": '{"type": '}, "guided_json", "not valid JSON"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex", "not several"),
    ],
)
def test_bad_structured_outputs_are_400_naming_their_field(kw: dict, param: str, words: str) -> None:
    for plan, req in ((plan_chat, chat(**kw)), (plan_completion, completion(**kw))):
        with pytest.raises(APIError) as info:
            plan(req, FakeEngine(), LIMITS, "fake")
        assert (info.value.status, info.value.param) == (400, param)
        assert words in info.value.body()["error"]["message"]


def test_echo_with_logprobs_asks_the_engine_for_prompt_logprobs() -> None:
    plan = plan_completion(completion(echo=True, logprobs=2), FakeEngine(), LIMITS, "fake")
    assert plan.requests[0].params.prompt_logprobs == 2
    assert plan.first_ids == (plan.requests[0].prompt_ids[0],)
    for kw in ({"echo": True}, {"logprobs": 2}, {}):
        assert (
            plan_completion(completion(**kw), FakeEngine(), LIMITS, "fake").requests[0].params.prompt_logprobs
            is None
        )


WEATHER = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
TOOLS = [
    {"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "time"}},
]


def test_forced_tool_calls_become_a_constraint_and_the_tools_reach_the_template() -> None:
    import json

    named = plan_chat(chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}}),
                      FakeEngine(), LIMITS, "fake")  # fmt: skip
    spec = named.requests[0].params.structured
    assert spec is not None and json.loads(spec.spec) == WEATHER
    assert named.tools is not None and named.tools.named == "weather"
    assert "<tool:weather><tool:time>" in FakeEngine().decode(list(named.requests[0].prompt_ids))
    required = plan_chat(chat(tools=TOOLS, tool_choice="required", parallel_tool_calls=False), FakeEngine(),
                         LIMITS, "fake")  # fmt: skip
    schema = json.loads(required.requests[0].params.structured.spec)
    assert schema["type"] == "array" and schema["maxItems"] == 1
    assert [i["properties"]["name"]["const"] for i in schema["items"]["anyOf"]] == ["weather", "time"]
    none = plan_chat(chat(tools=TOOLS, tool_choice="none"), FakeEngine(), LIMITS, "fake")
    assert none.tools is None and none.requests[0].params.structured is None


def test_tool_plan_reads_answers_as_openai_tool_calls() -> None:
    import json

    from inferforge.serve.openai.tools import ToolPlan

    content, (call,) = ToolPlan("weather").answer('{"city": "Oslo"}')
    assert content is None and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Oslo"
    }
    required = '[{"name": "time", "parameters": {}}, {"name": "weather", "parameters": {"city": "X"}}]'
    _, calls = ToolPlan(None).answer(required)
    assert [c["function"]["name"] for c in calls] == ["time", "weather"]
    assert ToolPlan("weather").answer('{"city": "Os') == ('{"city": "Os', None)  # cut by max_tokens: text


@pytest.mark.parametrize(
    ("kw", "param", "words"),
    [
        ({"tools": TOOLS}, "tool_choice", "auto"),
        ({"tools": TOOLS, "tool_choice": "auto"}, "tool_choice", "parser"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "tool_choice is"),
        ({"tools": [{"type": "retrieval"}], "tool_choice": "required"}, "tools[0]", "a tool is"),
        (
            {"tools": [{"type": "function", "function": {"name": "a b"}}], "tool_choice": "required"},
            "tools[0].function.name",
            "1-64",
        ),
        ({"tools": TOOLS + TOOLS[:1], "tool_choice": "required"}, "tools[2].function.name", "two tools"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
            "schema",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
            "not both",
        ),
    ],
)
def test_bad_tool_requests_are_400_naming_their_field(kw: dict, param: str, words: str) -> None:
    with pytest.raises(APIError) as info:
        plan_chat(chat(**kw), FakeEngine(), LIMITS, "fake")
    assert (info.value.status, info.value.param) == (400, param)
    assert words in info.value.body()["error"]["message"]


def test_max_tokens_zero_scores_the_prompt_only_with_echo() -> None:
    plan = plan_completion(completion(max_tokens=0, echo=True, logprobs=1), FakeEngine(), LIMITS, "fake")
    assert plan.prompt_only and plan.requests[0].params.max_tokens == 1
    assert plan.requests[0].params.prompt_logprobs == 1
    with pytest.raises(APIError) as info:
        plan_completion(completion(max_tokens=0), FakeEngine(), LIMITS, "fake")
    assert info.value.param == "max_tokens" and "echo" in info.value.body()["error"]["message"]
