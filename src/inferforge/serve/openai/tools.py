"""Tool calls on the chat route, forced by structured output (vLLM's way for these two choices).

`tool_choice: {"type": "function", "function": {"name": ...}}` constrains the answer to that function's
parameters schema; `"required"` to a JSON list of `{"name": ..., "parameters": {...}}`, one of the given
functions each (one call, or several with `parallel_tool_calls`). Either way the answer parses, whatever the
model, and comes back as `tool_calls`. The tools are rendered into the prompt by the model's own chat
template (transformers passes them to it), so the model sees what it may call.

`"auto"` (OpenAI's default when tools are given) needs a parser of the model's own tool-call syntax.
With `serve-llm --tool-call-parser hermes` (vLLM's flag and names) the answer is read for Hermes / Qwen2.5
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` blocks, with `llama3_json` for Llama 3.1-3.3's
`{"name": ..., "parameters": ...}` answers, with `mistral` for Mistral's `[TOOL_CALLS]`, unconstrained;
streamed, text goes out as it comes and the tool calls as they are written (`tool_stream`). Without a
parser "auto" is a 400 that says which choices work, rather than text that a client would take for "no tool
called". `"none"` renders the tools and generates text.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from inferforge.llm.protocol import StructuredOutput
from inferforge.serve.openai.errors import bad_param

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_PY_TAG = "<|python_tag|>"
_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call(name: str, args: Any) -> dict:
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)  # as vLLM
    return {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def hermes_calls(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of an answer in the Hermes / Qwen2.5 format: `<tool_call>{"name": ...,
    "arguments": {...}}</tool_call>` blocks after optional text. Any block that does not parse leaves the
    whole answer as text (None calls), as vLLM's parser does."""
    blocks = _HERMES.findall(text)
    if _OPEN not in text or not blocks:
        return text, None
    calls = []
    for block in blocks:
        try:
            obj = json.loads(block)
            calls.append(_call(obj["name"], obj.get("arguments", {})))
        except (ValueError, KeyError, TypeError):
            return text, None
    return text[: text.index(_OPEN)].strip() or None, calls


def llama3_json_calls(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of an answer in Llama 3.1-3.3's JSON format: the whole answer is one or more
    `{"name": ..., "parameters": {...}}` objects (";"-separated), after an optional `<|python_tag|>`. An
    answer that is not wholly such objects is text."""
    body = text.strip()
    if body.startswith(_PY_TAG):
        body = body[len(_PY_TAG) :].lstrip()
    if not body.startswith("{"):
        return text, None
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        try:
            obj, at = decoder.raw_decode(body, at)
        except ValueError:
            return text, None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, None
        calls.append(_call(obj["name"], obj.get("parameters", obj.get("arguments", {}))))
        while at < len(body) and body[at] in " \t\n;":
            at += 1
    return None, calls


_MISTRAL, _ARGS = "[TOOL_CALLS]", "[ARGS]"


def mistral_calls(text: str) -> tuple[str | None, list[dict] | None]:
    """(content, calls) of a Mistral answer: text, then `[TOOL_CALLS]` and a JSON list of `{"name": ...,
    "arguments": {...}}` (v0.3 tokenizers), or `[TOOL_CALLS]name[ARGS]{...}` per call (tokenizers v11 and
    later). `[TOOL_CALLS]` is a control token: the server keeps special tokens' text for this parser. An
    answer whose calls do not all parse is text."""
    if _MISTRAL not in text:
        return text, None
    content, _, rest = text.partition(_MISTRAL)
    calls = []
    try:
        if _ARGS in rest:
            for part in text.split(_MISTRAL)[1:]:
                name, _, args = part.partition(_ARGS)
                calls.append(_call(name.strip(), json.loads(args)))
        else:
            for obj in json.loads(rest):
                calls.append(_call(obj["name"], obj.get("arguments", {})))
    except (ValueError, KeyError, TypeError, AttributeError):
        return text, None
    if not calls:
        return text, None
    return content.strip() or None, calls


# `--tool-call-parser` names (vLLM's) and how each reads a finished answer
TOOL_CALL_PARSERS = {"hermes": hermes_calls, "llama3_json": llama3_json_calls, "mistral": mistral_calls}
# parsers of a syntax written with control tokens: their requests keep special tokens' text
SPECIAL_TOKEN_PARSERS = ("mistral",)


@dataclass(frozen=True)
class ToolPlan:
    """How a chat answer becomes tool calls: one named function's arguments, a list of calls ("required"),
    or, with a tool-call parser, whatever calls the model wrote ("auto")."""

    named: str | None  # the function every answer calls; None: "required" or "auto"
    parser: str | None = None  # "auto": the model's own syntax, read by this `TOOL_CALL_PARSERS` entry

    def answer(self, text: str) -> tuple[str | None, list[dict] | None]:
        """(content, tool calls) of a finished answer; calls None when there are none or it does not parse
        (a forced call cut by max_tokens): then the text is the content."""
        if self.parser is not None:
            return TOOL_CALL_PARSERS[self.parser](text)
        try:
            value = json.loads(text)
        except ValueError:
            return text, None
        if self.named is not None:
            return None, [_call(self.named, value)]
        return None, [_call(c["name"], c["parameters"]) for c in value]

    @property
    def finish_reason(self) -> str:
        return "stop" if self.named is not None else "tool_calls"  # as OpenAI answers a forced function


class AutoToolStream:
    """One streamed choice under "auto": text goes out as it comes, except what may be the start of a tool
    call (held until it cannot be) and everything from one on (held to the end, then sent as tool calls, or
    as text if it does not parse). Hermes and Mistral calls may start anywhere (`<tool_call>`,
    `[TOOL_CALLS]`); Llama 3's only at the answer's start (`{` or `<|python_tag|>`)."""

    def __init__(self, parser: str = "hermes") -> None:
        self.parser = parser
        self.pending = ""  # text not yet sent
        self.calling = False  # a call has started: the rest is held
        self.plain = False  # (llama3_json) the answer started as text: no call can follow
        self.tag = _MISTRAL if parser == "mistral" else _OPEN  # where a call may start, anywhere in the text

    def feed(self, delta: str) -> str:
        """The part of the text so far that may go out now."""
        self.pending += delta
        if self.calling:
            return ""
        if self.parser == "llama3_json":
            return self._feed_json()
        tag = self.tag
        at = self.pending.find(tag)
        if at >= 0:
            out, self.pending, self.calling = self.pending[:at], self.pending[at:], True
            return out
        keep = next((k for k in range(len(tag) - 1, 0, -1) if self.pending.endswith(tag[:k])), 0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _feed_json(self) -> str:
        head = self.pending.lstrip()
        if not self.plain:
            if head.startswith(("{", _PY_TAG)):
                self.calling = True
                return ""
            if not head or _PY_TAG.startswith(head):  # may still become a call
                return ""
            self.plain = True
        out, self.pending = self.pending, ""
        return out

    def finish(self) -> tuple[str, list[dict] | None]:
        """(text still to send, tool calls) at the end of the choice."""
        text, self.pending = self.pending, ""
        if not self.calling:
            return text, None
        _, calls = TOOL_CALL_PARSERS[self.parser](text)  # text before a Hermes tag already went out
        return ("", calls) if calls is not None else (text, None)


def plan_tools(
    req: Any, parser: str | None = None
) -> tuple[list[dict] | None, ToolPlan | None, StructuredOutput | None]:
    """(tools for the chat template, how to read the answer, the constraint to decode under). `parser`: the
    operator's `--tool-call-parser`, which "auto" needs."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_param("tool_choice", "tool_choice needs tools; send tools or drop tool_choice.")
        return None, None, None
    schemas = _functions(req.tools)
    if (choice is None or choice == "auto") and parser is not None:
        return list(req.tools), ToolPlan(None, parser=parser), None
    if choice is None or choice == "auto":
        raise bad_param(
            "tool_choice",
            "tool_choice 'auto' (the default with tools) needs a parser of this model's own tool-call "
            "format (start the server with --tool-call-parser hermes or llama3_json); send "
            "tool_choice 'required', 'none', or "
            '{"type": "function", "function": {"name": ...}}.',
        )
    if choice == "none":
        return list(req.tools), None, None
    if choice == "required":
        items = [{"type": "object", "properties": {"name": {"const": name}, "parameters": params},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, params in schemas.items()]  # fmt: skip
        schema: dict = {"type": "array", "items": {"anyOf": items}, "minItems": 1}
        if req.parallel_tool_calls is False:
            schema["maxItems"] = 1
        return list(req.tools), ToolPlan(None), StructuredOutput("json_schema", json.dumps(schema))
    name = _named(choice)
    if name not in schemas:
        raise bad_param("tool_choice", f"tool_choice names {name!r}, which is not among the tools given.")
    return list(req.tools), ToolPlan(name), StructuredOutput("json_schema", json.dumps(schemas[name]))


def _functions(tools: list) -> dict[str, dict]:
    """Each function's parameters schema by name; 400 naming what is malformed."""
    out: dict[str, dict] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise bad_param(f"tools[{i}]", 'a tool is {"type": "function", "function": {"name": ...}}.')
        name, params = fn.get("name"), fn.get("parameters", {"type": "object"})
        if not isinstance(name, str) or not _NAME.match(name):
            raise bad_param(f"tools[{i}].function.name", "a function name is 1-64 of a-z, A-Z, 0-9, _ and -.")
        if name in out:
            raise bad_param(f"tools[{i}].function.name", f"two tools are named {name!r}.")
        if not isinstance(params, dict):
            raise bad_param(f"tools[{i}].function.parameters", "parameters must be a JSON schema object.")
        out[name] = params
    return out


def _named(choice: Any) -> str:
    fn = choice.get("function") if isinstance(choice, dict) else None
    if not isinstance(choice, dict) or choice.get("type") != "function" or not isinstance(fn, dict):
        raise bad_param(
            "tool_choice",
            'tool_choice is "none", "auto", "required" or {"type": "function", "function": {"name": ...}}.',
        )
    return str(fn.get("name"))
