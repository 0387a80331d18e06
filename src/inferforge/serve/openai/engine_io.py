"""Drive the engine for one HTTP request: merge the streams of its prompts and always clean up.

Whatever ends the HTTP request early (client disconnect, server shutdown, an error while writing) cancels the
consumer; the `finally` blocks below then abort every engine request that has not finished, under a shielded
cancel scope so the abort itself is not cancelled too. That is what frees the KV blocks of a vanished client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field

import anyio

from inferforge.llm.protocol import EngineClient, EngineOutput, EngineRequest, RequestTiming


@dataclass
class Tracker:
    """Per-HTTP-request bookkeeping: which sequences finished, token counts, the latest engine timing."""

    n: int
    prompt_only: bool = False  # max_tokens 0 with echo: the token computed is not the answer's, nor counted
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[tuple[int, int], int] = field(default_factory=dict)
    timings: dict[int, RequestTiming] = field(default_factory=dict)
    finished: set[tuple[int, int]] = field(default_factory=set)
    aborted: set[int] = field(default_factory=set)  # prompts the engine ended with finish_reason "abort"

    def update(self, prompt_idx: int, out: EngineOutput) -> None:
        self.prompt_tokens[prompt_idx] = out.prompt_tokens
        self.completion_tokens[(prompt_idx, out.index)] = out.completion_tokens
        self.timings[prompt_idx] = out.timing
        if out.finished:
            self.finished.add((prompt_idx, out.index))
            if out.finish_reason == "abort":
                self.aborted.add(prompt_idx)

    def usage(self) -> dict[str, int]:
        p = sum(self.prompt_tokens.values())
        c = 0 if self.prompt_only else sum(self.completion_tokens.values())
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def prompt_done(self, prompt_idx: int) -> bool:
        return all((prompt_idx, i) in self.finished for i in range(self.n))


async def _close(engine: EngineClient, gen: AsyncIterator[EngineOutput], request_id: str, done: bool) -> None:
    with anyio.CancelScope(shield=True):
        aclose = getattr(gen, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        if not done:
            with contextlib.suppress(Exception):
                await engine.abort(request_id)


async def run_requests(
    engine: EngineClient, requests: tuple[EngineRequest, ...], tracker: Tracker
) -> AsyncGenerator[tuple[int, EngineOutput], None]:
    """Yield (prompt index, output) for every engine output of every prompt, in arrival order."""
    if len(requests) == 1:
        gen = engine.generate(requests[0])
        try:
            async for out in gen:
                tracker.update(0, out)
                yield 0, out
        finally:
            await _close(engine, gen, requests[0].request_id, tracker.prompt_done(0))
        return
    queue: asyncio.Queue[tuple[int, EngineOutput | BaseException | None]] = asyncio.Queue()

    async def pump(idx: int, req: EngineRequest) -> None:
        gen = engine.generate(req)
        finished: set[int] = set()
        try:
            async for out in gen:
                if out.finished:
                    finished.add(out.index)
                await queue.put((idx, out))
            await queue.put((idx, None))
        except Exception as exc:
            await queue.put((idx, exc))
        finally:
            await _close(engine, gen, req.request_id, len(finished) == req.params.n)

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        remaining = len(tasks)
        while remaining:
            idx, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                tracker.update(idx, item)
                yield idx, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
