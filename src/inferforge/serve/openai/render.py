"""Engine outputs into OpenAI response bodies: whole responses, stream chunks, and both logprobs shapes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from inferforge.llm.protocol import EngineClient, EngineOutput, PromptScores, TokenLogprob
from inferforge.serve.openai.tools import ToolPlan


class TokenText:
    """Token id to its text, cached: logprobs name every token and its alternatives."""

    def __init__(self, engine: EngineClient) -> None:
        self.engine = engine
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        s = self.cache.get(token_id)
        if s is None:
            s = self.cache[token_id] = self.engine.decode([token_id])
        return s


def completion_logprobs(text_of: TokenText, lps: tuple[TokenLogprob, ...], offset: int) -> tuple[dict, int]:
    """Legacy completions shape; `text_offset` counts characters from the start of the choice's text."""
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        tok = text_of(lp.token_id)
        tokens.append(tok)
        token_lps.append(lp.logprob)
        top: dict[str, float] = {}
        for t, v in lp.top:  # distinct ids can share a text (partial UTF-8): keep the likelier, listed first
            top.setdefault(text_of(t), v)
        tops.append(top)
        offsets.append(offset)
        offset += len(tok)
    return {
        "tokens": tokens,
        "token_logprobs": token_lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }, offset


def echo_logprobs(text_of: TokenText, first_id: int, prompt: PromptScores) -> dict:
    """The prompt's part of the legacy logprobs block (`echo` with `logprobs`): its first token has no
    logprob and no alternatives (null), as in OpenAI's and vLLM's responses."""
    first = text_of(first_id)
    block, _ = completion_logprobs(text_of, tuple(prompt), len(first))
    return {
        "tokens": [first, *block["tokens"]],
        "token_logprobs": [None, *block["token_logprobs"]],
        "top_logprobs": [None, *block["top_logprobs"]],
        "text_offset": [0, *block["text_offset"]],
    }


def join_logprobs(head: dict, tail: dict) -> dict:
    return {key: head[key] + tail[key] for key in head}


def _entry(tok: str, logprob: float) -> dict[str, Any]:
    return {"token": tok, "logprob": logprob, "bytes": list(tok.encode("utf-8"))}


def chat_logprobs(text_of: TokenText, lps: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    out = []
    for lp in lps:
        e = _entry(text_of(lp.token_id), lp.logprob)
        e["top_logprobs"] = [_entry(text_of(t), v) for t, v in lp.top]
        out.append(e)
    return out


@dataclass
class ChoiceState:
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: PromptScores | None = None


class Accumulator:
    """Collects the deltas of every choice of a non-streaming request; choice index = prompt * n + seq."""

    def __init__(self, n_prompts: int, n: int) -> None:
        self.n = n
        self.choices = [ChoiceState() for _ in range(n_prompts * n)]

    def add(self, prompt_idx: int, out: EngineOutput) -> None:
        c = self.choices[prompt_idx * self.n + out.index]
        c.text.append(out.new_text)
        if out.logprobs:
            c.logprobs.extend(out.logprobs)
        if out.prompt_logprobs is not None:
            c.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            c.finish_reason = out.finish_reason

    def completion(
        self,
        text_of: TokenText,
        echo: tuple[str, ...],
        want_logprobs: bool,
        first_ids: tuple[int, ...] = (),
        prompt_only: bool = False,
    ) -> list[dict]:
        """`first_ids`: each prompt's first token, for the echoed prompt's logprobs. `prompt_only`
        (max_tokens 0): the choice is the echoed prompt alone, `finish_reason` "length"."""
        out = []
        for i, c in enumerate(self.choices):
            prefix = echo[i // self.n]
            generated = () if prompt_only else tuple(c.logprobs)
            lp = completion_logprobs(text_of, generated, len(prefix))[0] if want_logprobs else None
            if lp is not None and prefix and c.prompt_logprobs is not None:
                lp = join_logprobs(echo_logprobs(text_of, first_ids[i // self.n], c.prompt_logprobs), lp)
            text = prefix + ("" if prompt_only else "".join(c.text))
            finish = "length" if prompt_only and c.finish_reason != "abort" else c.finish_reason or "abort"
            out.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        return out

    def chat(self, text_of: TokenText, want_logprobs: bool, tools: ToolPlan | None = None) -> list[dict]:
        out = []
        for i, c in enumerate(self.choices):
            lp = (
                {"content": chat_logprobs(text_of, tuple(c.logprobs)), "refusal": None}
                if want_logprobs
                else None
            )
            text, finish = "".join(c.text), c.finish_reason or "abort"
            msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
            if tools is not None and c.finish_reason == "stop":  # a call cut by max_tokens stays text
                content, calls = tools.answer(text)
                if calls is not None:
                    msg, finish = {**msg, "content": content, "tool_calls": calls}, tools.finish_reason
            out.append({"index": i, "message": msg, "logprobs": lp, "finish_reason": finish})
        return out


def envelope(rid: str, obj: str, created: int, model: str, choices: list[dict], usage: Any) -> dict:
    body = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
    if usage is not False:
        body["usage"] = usage
    return body
