"""Streamed tool calls as OpenAI and vLLM stream them: a call's first delta carries its id and name as soon as
the name is written, the later ones its arguments' JSON text as the model writes it.

Before, a choice's calls went out whole when it ended, so a client showing a call being written (a chat UI,
an agent that starts a slow tool early) saw nothing until the last token. The answer's text is scanned again
on each delta (answers are short) by `partial_calls`, which reads the calls' objects as far as they are
written; what is new since the last delta goes out. Sent deltas cannot be taken back: a forced call cut by
max_tokens ends with the arguments written so far and finish_reason "length", as OpenAI's does; an "auto"
answer whose call breaks after its name was sent ends as tool calls (vLLM's parsers behave the same), while
one that never completes a name falls back to text, as unstreamed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from inferforge.serve.openai.tools import (
    _ARGS,
    _CLOSE,
    _MISTRAL,
    _OPEN,
    _PY_TAG,
    AutoToolStream,
    ToolPlan,
    new_call_id,
)

_ARG_KEYS = ("arguments", "parameters")


@dataclass
class PartialCall:
    """One call as far as it is written: its name once the string is complete, and the raw JSON text of its
    arguments from the value's first character (`args_done` once the value is complete)."""

    name: str | None = None
    args: str = ""
    args_done: bool = False


def _string_end(text: str, i: int) -> int:
    """Index just past the string literal starting at text[i] (a quote), or -1 if it is not closed yet."""
    j, escaped = i + 1, False
    while j < len(text):
        c = text[j]
        if escaped:
            escaped = False
        elif c == "\\":
            escaped = True
        elif c == '"':
            return j + 1
        j += 1
    return -1


def partial_calls(text: str, call_depth: int = 1) -> list[PartialCall]:
    """The call objects (`{"name": ..., "arguments" | "parameters": ...}`) at nesting depth `call_depth` of
    `text` (1: objects one after another, 2: objects in an array), each as far as it is written."""
    calls: list[PartialCall] = []
    cur: PartialCall | None = None
    depth, key, want_key, args_at = 0, None, True, -1
    i = 0
    while i < len(text):
        c = text[i]
        if c == '"':
            end = _string_end(text, i)
            if end < 0:
                break
            if cur is not None and depth == call_depth:
                try:
                    literal = json.loads(text[i:end])
                except ValueError:  # a bad escape: the call cannot parse; nothing more of it is read
                    break
                if want_key:
                    key = literal
                elif key == "name" and isinstance(literal, str):
                    cur.name = literal
                elif key in _ARG_KEYS:  # arguments given as a JSON string: its text, once complete
                    cur.args, cur.args_done = literal if isinstance(literal, str) else text[i:end], True
            i = end
            continue
        if c in "{[":
            depth += 1
            if depth == call_depth and c == "{":
                cur, key, want_key = PartialCall(), None, True
                calls.append(cur)
            elif depth == call_depth + 1 and cur is not None and not want_key and key in _ARG_KEYS:
                args_at = i
        elif c in "}]":
            if depth == call_depth + 1 and cur is not None and args_at >= 0:
                cur.args, cur.args_done, args_at = text[args_at : i + 1], True, -1
            if depth == call_depth:
                cur = None
            depth -= 1
            if depth < 0:
                break
        elif c == ":" and depth == call_depth:
            want_key = False
        elif c == "," and depth == call_depth:
            want_key = True
        i += 1
    if cur is not None and args_at >= 0:
        cur.args = text[args_at:]
    return calls


def _hermes_bodies(held: str) -> str:
    """The call objects of Hermes blocks in `held` (text from the first tag on), one after another."""
    parts = []
    for block in held.split(_OPEN)[1:]:
        parts.append(block.split(_CLOSE)[0])
    return "\n".join(parts)


def _mistral_calls(held: str) -> list[PartialCall]:
    """Mistral's calls in `held` (text from the first `[TOOL_CALLS]` on): `name[ARGS]{...}` per call, or
    one JSON list of call objects."""
    parts = held.split(_MISTRAL)[1:]
    if not any(_ARGS in p for p in parts):
        return partial_calls(parts[0] if parts else "", call_depth=2)
    calls = []
    for part in parts:
        name, found, args = part.partition(_ARGS)
        if not found:
            break  # the name may not be complete yet
        calls.append(PartialCall(name.strip(), *_json_prefix(args)))
    return calls


def _json_prefix(text: str) -> tuple[str, bool]:
    """(the JSON value at the start of `text` as far as it is written, whether it is complete): a complete
    value ends where it ends; an incomplete one keeps back a tail that may be the start of the next call's
    tag (text fed in pieces smaller than the tag's token)."""
    body = text.lstrip()
    try:
        _, end = json.JSONDecoder().raw_decode(body)
        return body[:end], True
    except ValueError:
        keep = next((k for k in range(len(_MISTRAL) - 1, 0, -1) if body.endswith(_MISTRAL[:k])), 0)
        return body[: len(body) - keep], False


class ToolCallStream:
    """One streamed choice under a tool plan: `feed` each text delta, then `finish`. Each returns (content to
    send, tool-call deltas in OpenAI's stream shape)."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.auto = AutoToolStream(plan.parser) if plan.parser is not None else None
        self.text = ""  # everything the model wrote (named / required)
        self.ids: list[str] = []  # the id of each call started
        self.sent: list[int] = []  # arguments characters sent, per call

    @property
    def started(self) -> bool:
        return bool(self.ids)

    def _calls(self) -> list[PartialCall]:
        if self.plan.named is not None:
            return [PartialCall(self.plan.named, self.text)]
        if self.auto is None:  # "required": a JSON array of calls
            return partial_calls(self.text, call_depth=2)
        if not self.auto.calling:
            return []
        held = self.auto.pending
        if self.plan.parser == "hermes":
            return partial_calls(_hermes_bodies(held))
        if self.plan.parser == "mistral":
            return _mistral_calls(held)
        body = held.lstrip()
        return partial_calls(body[len(_PY_TAG) :] if body.startswith(_PY_TAG) else body)

    def _deltas(self) -> list[dict]:
        out = []
        for k, call in enumerate(self._calls()):
            if call.name is None:
                break  # a later call cannot start before this one's name is known
            fn: dict = {}
            delta: dict = {"index": k, "function": fn}
            if k == len(self.ids):
                self.ids.append(new_call_id())
                self.sent.append(0)
                delta.update(id=self.ids[k], type="function")
                fn.update(name=call.name, arguments="")
            if len(call.args) > self.sent[k]:
                fn["arguments"] = call.args[self.sent[k] :]
                self.sent[k] = len(call.args)
            if fn:
                out.append(delta)
        return out

    def feed(self, delta: str) -> tuple[str, list[dict]]:
        content = ""
        if self.auto is not None:
            content = self.auto.feed(delta)
        else:
            self.text += delta
        return content, self._deltas()

    def finish(self) -> tuple[str, list[dict]]:
        """What is left. An answer that started no call gives its text back as content, as unstreamed: an
        "auto" answer its held text, a "required" one cut before its first name the text it has."""
        deltas = self._deltas()
        if self.started:
            return "", deltas
        if self.auto is not None:
            return self.auto.finish()[0], []
        return self.text, []
