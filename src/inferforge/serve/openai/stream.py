"""Server-sent events for both routes: `data: {chunk}\\n\\n` per engine delta, optional usage chunk, `[DONE]`.

The generators receive the first engine output already awaited (so queue-full and similar errors could
still be answered with a status code) and the rest of the merged iterator; closing them aborts the
unfinished.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from json.encoder import encode_basestring as _str  # C-accelerated; keeps non-ASCII as is

import anyio

from inferforge.llm.protocol import EngineOutput, merge_outputs
from inferforge.serve.openai.convert import Plan
from inferforge.serve.openai.engine_io import Tracker
from inferforge.serve.openai.errors import error_body
from inferforge.serve.openai.metrics import ITLClock, ServerMetrics
from inferforge.serve.openai.render import (
    TokenText,
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    envelope,
    join_logprobs,
)
from inferforge.serve.openai.tool_stream import ToolCallStream

DONE = b"data: [DONE]\n\n"


def sse(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


@dataclass
class StreamCtx:
    plan: Plan
    model: str
    created: int
    tracker: Tracker
    metrics: ServerMetrics
    text_of: TokenText
    include_usage: bool
    first: tuple[int, EngineOutput] | None
    rest: AsyncGenerator[tuple[int, EngineOutput], None]
    on_finish: Callable[[], None]
    interval: int = 1  # tokens per chunk after a sequence's first (`--stream-interval`)
    continuous_usage: bool = False  # every chunk carries the usage so far (vLLM's `continuous_usage_stats`)

    def chunk_usage(self) -> dict | bool | None:
        """The `usage` of a token chunk: False (no field), None (null until the last chunk) or the counts."""
        if not self.include_usage:
            return False
        return self.tracker.usage() if self.continuous_usage else None

    def unfinished(self) -> list[tuple[int, int]]:
        """(prompt, sequence) pairs the engine ended without a finish reason (aborted, e.g. at drain end)."""
        done = self.tracker.finished
        return [
            (p, s) for p in range(len(self.plan.requests)) for s in range(self.plan.n) if (p, s) not in done
        ]


async def _outputs(ctx: StreamCtx) -> AsyncIterator[tuple[int, EngineOutput]]:
    itl = ITLClock(ctx.metrics.itl)
    if ctx.first is not None:
        itl.tick((ctx.first[0], ctx.first[1].index), len(ctx.first[1].new_token_ids))
        yield ctx.first
    if ctx.interval <= 1:
        async for idx, out in ctx.rest:
            itl.tick((idx, out.index), len(out.new_token_ids))
            yield idx, out
        return
    async for idx, out in _every(ctx.rest, ctx.interval, ctx.first):
        itl.tick((idx, out.index), len(out.new_token_ids))
        yield idx, out


async def _every(
    outs: AsyncIterator[tuple[int, EngineOutput]], interval: int, first: tuple[int, EngineOutput] | None
) -> AsyncIterator[tuple[int, EngineOutput]]:
    """A sequence's first delta at once, then one per `interval` tokens and its last: each SSE chunk costs the
    server a socket write and a pass through the framework, so fewer chunks leave cores to more streams."""
    sent = {(first[0], first[1].index)} if first is not None else set()
    held: dict[tuple[int, int], EngineOutput] = {}
    async for idx, out in outs:
        key = (idx, out.index)
        prev = held.pop(key, None)
        if prev is not None:
            out = merge_outputs(prev, out)
        if key in sent and not out.finished and len(out.new_token_ids) < interval:
            held[key] = out
            continue
        sent.add(key)
        yield idx, out


async def _guarded(ctx: StreamCtx, body: AsyncIterator[bytes]) -> AsyncGenerator[bytes, None]:
    """Frame the route's chunks: errors mid-stream become an error event; always close the engine side."""
    try:
        async for chunk in body:
            yield chunk
        if ctx.include_usage:
            yield sse(
                envelope(ctx.plan.response_id, _obj(ctx), ctx.created, ctx.model, [], ctx.tracker.usage())
            )
        yield DONE
    except Exception as exc:  # the status line is gone; tell the client in the stream, as OpenAI does
        yield sse(error_body(500, f"generation failed: {exc}", code="engine_error"))
        yield DONE
    finally:
        with anyio.CancelScope(shield=True):
            await ctx.rest.aclose()
        ctx.on_finish()


def _obj(ctx: StreamCtx) -> str:
    return "chat.completion.chunk" if ctx.plan.response_id.startswith("chatcmpl") else "text_completion"


_FINISH = {None: "null", "stop": '"stop"', "length": '"length"', "abort": '"abort"'}


class _Frames:
    """Per-token chunks without logprobs, built from string templates: only the token text goes through the
    JSON encoder. This is the hot path (one chunk per token per stream), so it skips building dicts."""

    def __init__(self, ctx: StreamCtx, obj: str) -> None:
        self.head = (
            f'data: {{"id":{_str(ctx.plan.response_id)},"object":"{obj}","created":{ctx.created},'
            f'"model":{_str(ctx.model)},"choices":[{{"index":'
        )
        self.tail = ("]," + '"usage":null}\n\n') if ctx.include_usage else "]}\n\n"
        self.ctx = ctx

    def _tail(self) -> str:
        if not self.ctx.continuous_usage:
            return self.tail
        return '],"usage":' + json.dumps(self.ctx.tracker.usage(), separators=(",", ":")) + "}\n\n"

    def completion(self, index: int, text: str, finish: str | None) -> bytes:
        body = f'{index},"text":{_str(text)},"logprobs":null,"finish_reason":{_FINISH.get(finish, "null")}}}'
        return (self.head + body + self._tail()).encode()

    def chat(self, index: int, content: str | None, finish: str | None) -> bytes:
        delta = "{}" if content is None else f'{{"content":{_str(content)}}}'
        body = f'{index},"delta":{delta},"logprobs":null,"finish_reason":{_FINISH.get(finish, "null")}}}'
        return (self.head + body + self._tail()).encode()


def completion_stream(ctx: StreamCtx) -> AsyncGenerator[bytes, None]:
    async def body() -> AsyncIterator[bytes]:
        n, plan = ctx.plan.n, ctx.plan
        offsets: dict[int, int] = {}
        frames = _Frames(ctx, "text_completion")
        async for idx, out in _outputs(ctx):
            i = idx * n + out.index
            text = out.new_text
            if plan.prompt_only:  # max_tokens 0: the prompt (and its logprobs) once, nothing generated
                if i not in offsets:
                    offsets[i] = 0
                    yield _prompt_only_chunk(ctx, idx, i, out)
                continue
            if i not in offsets:
                text = plan.prompt_texts[idx] + text
                offsets[i] = len(plan.prompt_texts[idx])
            if plan.logprobs is None or out.logprobs is None:
                yield frames.completion(i, text, out.finish_reason)
                continue
            lp, offsets[i] = completion_logprobs(ctx.text_of, out.logprobs, offsets[i])
            if out.prompt_logprobs is not None and plan.prompt_texts[idx]:  # echo: the prompt's come first
                lp = join_logprobs(echo_logprobs(ctx.text_of, plan.first_ids[idx], out.prompt_logprobs), lp)
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
            usage = ctx.chunk_usage()
            yield sse(envelope(plan.response_id, "text_completion", ctx.created, ctx.model, [choice], usage))
        for p, s in ctx.unfinished():
            yield frames.completion(p * n + s, "", "abort")

    return _guarded(ctx, body())


def chat_stream(ctx: StreamCtx) -> AsyncGenerator[bytes, None]:
    async def body() -> AsyncIterator[bytes]:
        usage = ctx.chunk_usage()
        if isinstance(usage, dict):  # the role chunk comes before any token
            usage = {**usage, "completion_tokens": 0, "total_tokens": usage["prompt_tokens"]}
        rid, created, model = ctx.plan.response_id, ctx.created, ctx.model
        frames = _Frames(ctx, "chat.completion.chunk")
        roles = [
            {
                "index": i,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for i in range(ctx.plan.n)
        ]
        yield sse(envelope(rid, "chat.completion.chunk", created, model, roles, usage))
        tools = ctx.plan.tools
        calls = [ToolCallStream(tools) for _ in range(ctx.plan.n)] if tools is not None else None
        async for _, out in _outputs(ctx):
            if calls is not None:  # tool calls as they are written (`tool_stream`)
                for chunk in _tool_chunks(ctx, calls[out.index], out, frames):
                    yield chunk
                continue
            content = out.new_text if out.new_text or not out.finished else None
            if ctx.plan.logprobs is None or out.logprobs is None:
                yield frames.chat(out.index, content, out.finish_reason)
                continue
            lp = {"content": chat_logprobs(ctx.text_of, out.logprobs), "refusal": None}
            delta = {} if content is None else {"content": content}
            choice = {"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}
            yield sse(envelope(rid, "chat.completion.chunk", created, model, [choice], ctx.chunk_usage()))
        for _, s in ctx.unfinished():
            yield frames.chat(s, None, "abort")

    return _guarded(ctx, body())


def _tool_chunks(ctx: StreamCtx, calls: ToolCallStream, out: EngineOutput, frames: _Frames) -> list[bytes]:
    """A delta's content and tool-call deltas; at the end of the choice its finish: the plan's ("stop" for a
    named function, "tool_calls" otherwise) once a call started and the model stopped, the engine's
    ("length", "abort") if it did not stop; an answer that started no call ends as the text it is."""
    content, deltas = calls.feed(out.new_text)
    chunks = [frames.chat(out.index, content, None)] if content else []
    if deltas:
        chunks.append(_calls_chunk(ctx, out.index, deltas, None))
    if not out.finished:
        return chunks
    rest, deltas = calls.finish()
    if deltas:
        chunks.append(_calls_chunk(ctx, out.index, deltas, None))
    if not calls.started:
        return [*chunks, frames.chat(out.index, rest, out.finish_reason)]
    finish = calls.plan.finish_reason if out.finish_reason == "stop" else out.finish_reason
    return [*chunks, _calls_chunk(ctx, out.index, [], finish)]


def _calls_chunk(ctx: StreamCtx, index: int, deltas: list[dict], finish: str | None) -> bytes:
    """Tool-call deltas of one choice (OpenAI's stream shape: `tool_calls`, each with its call's `index`);
    none: the choice's finish alone."""
    delta = {"tool_calls": deltas} if deltas else {}
    choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
    return sse(envelope(ctx.plan.response_id, "chat.completion.chunk", ctx.created, ctx.model, [choice],
                        ctx.chunk_usage()))  # fmt: skip


def _prompt_only_chunk(ctx: StreamCtx, idx: int, i: int, out: EngineOutput) -> bytes:
    plan = ctx.plan
    lp = None
    if plan.logprobs is not None and out.prompt_logprobs is not None:
        lp = echo_logprobs(ctx.text_of, plan.first_ids[idx], out.prompt_logprobs)
    finish = "abort" if out.finish_reason == "abort" else "length"
    choice = {"index": i, "text": plan.prompt_texts[idx], "logprobs": lp, "finish_reason": finish}
    return sse(
        envelope(plan.response_id, "text_completion", ctx.created, ctx.model, [choice], ctx.chunk_usage())
    )
