"""Server-sent events for both routes: `data: {chunk}\\n\\n` per engine delta, optional usage chunk, `[DONE]`.

The generators receive the first engine output already awaited (so queue-full and similar errors could
still be answered with a status code) and the rest of the merged iterator; closing them aborts the
unfinished.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass

import anyio

from inferforge.llm.protocol import EngineOutput
from inferforge.serve.openai.convert import Plan
from inferforge.serve.openai.engine_io import Tracker
from inferforge.serve.openai.errors import error_body
from inferforge.serve.openai.metrics import ITLClock, ServerMetrics
from inferforge.serve.openai.render import TokenText, chat_logprobs, completion_logprobs, envelope

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
    async for idx, out in ctx.rest:
        itl.tick((idx, out.index), len(out.new_token_ids))
        yield idx, out


async def _guarded(ctx: StreamCtx, body: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
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


def completion_stream(ctx: StreamCtx) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        n = ctx.plan.n
        offsets: dict[int, int] = {}
        usage = None if ctx.include_usage else False
        async for idx, out in _outputs(ctx):
            i = idx * n + out.index
            text = out.new_text
            if i not in offsets:
                text = ctx.plan.prompt_texts[idx] + text
                offsets[i] = len(ctx.plan.prompt_texts[idx])
            lp = None
            if ctx.plan.logprobs is not None and out.logprobs is not None:
                lp, offsets[i] = completion_logprobs(ctx.text_of, out.logprobs, offsets[i])
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": out.finish_reason}
            yield sse(
                envelope(ctx.plan.response_id, "text_completion", ctx.created, ctx.model, [choice], usage)
            )

    return _guarded(ctx, body())


def chat_stream(ctx: StreamCtx) -> AsyncIterator[bytes]:
    async def body() -> AsyncIterator[bytes]:
        usage = None if ctx.include_usage else False
        rid, created, model = ctx.plan.response_id, ctx.created, ctx.model
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
        async for _, out in _outputs(ctx):
            lp = None
            if ctx.plan.logprobs is not None and out.logprobs is not None:
                lp = {"content": chat_logprobs(ctx.text_of, out.logprobs), "refusal": None}
            delta = {"content": out.new_text} if out.new_text or not out.finished else {}
            choice = {"index": out.index, "delta": delta, "logprobs": lp, "finish_reason": out.finish_reason}
            yield sse(envelope(rid, "chat.completion.chunk", created, model, [choice], usage))
        for _, s in ctx.unfinished():
            choice = {"index": s, "delta": {}, "logprobs": None, "finish_reason": "abort"}
            yield sse(envelope(rid, "chat.completion.chunk", created, model, [choice], usage))

    return _guarded(ctx, body())
