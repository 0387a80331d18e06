"""The request fields that ask for structured output, as one `StructuredOutput` for the engine.

Three spellings reach servers like this one, and each is answered, never silently ignored:
- OpenAI's `response_format`: `{"type": "text"}`, `{"type": "json_object"}` or `{"type": "json_schema",
  "json_schema": {"name": ..., "schema": {...}, "strict": ...}}` (on both routes, as vLLM accepts it);
- vLLM's `structured_outputs`: one of `json` (a schema), `regex`, `choice`, `grammar` (Lark) or
  `json_object: true`;
- vLLM's older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`.

A request may use one of them. The constraint is compiled here (without the tokenizer) so a bad schema, regex
or grammar is a 400 that names its field before the request queues.
"""

from __future__ import annotations

import json
from typing import Any

from inferforge.llm.protocol import StructuredOutput
from inferforge.llm.structured import StructuredOutputError, check
from inferforge.serve.openai.errors import bad_param

_VLLM_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
_GUIDED = {"guided_json": "json_schema", "guided_regex": "regex", "guided_choice": "choice",
           "guided_grammar": "grammar"}  # fmt: skip


def structured_output(req: Any) -> StructuredOutput | None:
    """The request's constraint (None: free text); 400 for a malformed or conflicting one."""
    found: list[tuple[str, StructuredOutput]] = []
    fmt = _response_format(req.response_format)
    if fmt is not None:
        found.append(("response_format", fmt))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", _vllm(req.structured_outputs)))
    for field, kind in _GUIDED.items():
        value = getattr(req, field)
        if value is not None:
            found.append((field, _spec(field, kind, value)))
    if len(found) > 1:
        names = ", ".join(name for name, _ in found)
        raise bad_param(found[1][0], f"give one structured-output constraint, not several ({names}).")
    if not found:
        return None
    param, spec = found[0]
    try:
        check(spec)
    except StructuredOutputError as exc:
        raise bad_param(param, str(exc)) from None
    return spec


def _response_format(raw: dict | None) -> StructuredOutput | None:
    if raw is None:
        return None
    kind = raw.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput("json_object")
    if kind != "json_schema":
        raise bad_param(
            "response_format", f"response_format type {kind!r} is not one of text, json_object, json_schema."
        )
    body = raw.get("json_schema")
    if not isinstance(body, dict) or not isinstance(body.get("schema"), dict):
        raise bad_param(
            "response_format",
            'response_format of type json_schema needs "json_schema": {"name": ..., "schema": {...}}.',
        )
    return StructuredOutput("json_schema", json.dumps(body["schema"]))


def _vllm(raw: dict) -> StructuredOutput:
    keys = [k for k, v in raw.items() if v is not None and v is not False]
    unknown = [k for k in keys if k not in _VLLM_KEYS and k != "json_object"]
    if unknown:
        raise bad_param(
            "structured_outputs",
            f"structured_outputs field(s) {unknown} are not supported; use one of json, regex, choice, "
            "grammar or json_object.",
        )
    if len(keys) != 1:
        raise bad_param(
            "structured_outputs", "structured_outputs takes exactly one of json, regex, choice, grammar or "
            f"json_object; got {keys or 'none'}.",
        )  # fmt: skip
    key = keys[0]
    if key == "json_object":
        return StructuredOutput("json_object")
    return _spec("structured_outputs", _VLLM_KEYS[key], raw[key])


def _spec(param: str, kind: str, value: Any) -> StructuredOutput:
    """A schema (an object or its JSON text), a regex or grammar (a string) or choices (a list of strings)."""
    if kind == "json_schema":
        if isinstance(value, dict):
            return StructuredOutput("json_schema", json.dumps(value))
        if isinstance(value, str) and value:
            return StructuredOutput("json_schema", value)
        raise bad_param(param, "a JSON schema must be an object (or its JSON text).")
    if kind == "choice":
        if not isinstance(value, list) or not value or not all(isinstance(c, str) and c for c in value):
            raise bad_param(param, "choice needs a non-empty list of non-empty strings.")
        return StructuredOutput("choice", json.dumps(value))
    if not isinstance(value, str) or not value:
        raise bad_param(param, f"{kind} needs a non-empty string.")
    return StructuredOutput(kind, value)  # type: ignore[arg-type]
