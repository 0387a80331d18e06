"""Tool calls on the chat route, forced by structured output (vLLM's way for these two choices).

`tool_choice: {"type": "function", "function": {"name": ...}}` constrains the answer to that function's
parameters schema; `"required"` to a JSON list of `{"name": ..., "parameters": {...}}`, one of the given
functions each (one call, or several with `parallel_tool_calls`). Either way the answer parses, whatever the
model, and comes back as `tool_calls`. The tools are rendered into the prompt by the model's own chat
template (transformers passes them to it), so the model sees what it may call.

`"auto"` (OpenAI's default when tools are given) would need a parser of the model's own tool-call syntax
(Hermes tags, Llama 3 JSON, Mistral's `[TOOL_CALLS]`, ...); this server has none, so it answers 400 and says
which choices work, rather than return text that a client would take for "no tool called". `"none"`
renders the tools and generates text.
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


@dataclass(frozen=True)
class ToolPlan:
    """How a chat answer becomes tool calls: one named function's arguments, or a list of calls."""

    named: str | None  # the function every answer calls; None: "required" (a list of calls)

    def calls(self, text: str) -> list[dict] | None:
        """The answer's tool calls in OpenAI's shape; None when it does not parse (cut by max_tokens)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        pairs = (
            [(self.named, value)] if self.named is not None else [(c["name"], c["parameters"]) for c in value]
        )
        return [
            {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": name, "arguments": json.dumps(args)}}
            for name, args in pairs
        ]  # fmt: skip

    @property
    def finish_reason(self) -> str:
        return "stop" if self.named is not None else "tool_calls"  # as OpenAI answers a forced function


def plan_tools(req: Any) -> tuple[list[dict] | None, ToolPlan | None, StructuredOutput | None]:
    """(tools for the chat template, how to read the answer, the constraint to decode under)."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise bad_param("tool_choice", "tool_choice needs tools; send tools or drop tool_choice.")
        return None, None, None
    schemas = _functions(req.tools)
    if choice is None or choice == "auto":
        raise bad_param(
            "tool_choice",
            "tool_choice 'auto' (the default with tools) needs a parser of this model's own tool-call "
            "format, which this server does not have; send tool_choice 'required', 'none', or "
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
