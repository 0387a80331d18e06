"""`AsyncLLMEngine`: the engine behind an asyncio server, implementing `inferforge.llm.protocol.EngineClient`.

A background thread runs `LLMEngine.step()` while there is work and hands each `EngineOutput` to the event
loop of the request that owns it. Leaving the `generate()` iterator early (the client disconnected, the task
was cancelled) aborts the request, queued or running, and frees its KV blocks.

Constructor for servers and the CLI:

    engine = AsyncLLMEngine.from_pretrained(
        "path/to/hf_folder", device="cuda", dtype="auto", quant=None,  # or "int8" (CUDA)
        max_num_seqs=64, max_model_len=None, max_waiting=256,
        kv_cache_tokens=None, kv_cache_memory_fraction=0.9,
    )
    async for out in engine.generate(EngineRequest("id", tuple(engine.encode("Hi")), SamplingParams())): ...
    await engine.shutdown(grace_s=30)

`generate()` raises (on its first iteration) `QueueFullError` when the waiting queue is full,
`RequestTooLargeError` when the prompt plus max_tokens cannot fit, and `EngineClosedError` after shutdown
began; all are `InferforgeError`s, i.e. the client's fault or a retry-later, never a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferforge.errors import InferforgeError
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineOutput, EngineRequest, EngineStats


class EngineClosedError(InferforgeError):
    """The engine is shutting down and accepts no new requests (servers answer 503)."""


class EngineStepError(RuntimeError):
    """A step failed inside the engine (a bug or a device fault); every in-flight request gets this."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[EngineOutput | BaseException]


class AsyncLLMEngine:
    def __init__(self, engine: LLMEngine, model_name: str | None = None) -> None:
        self.engine = engine
        self.model_name = model_name or engine.folder.name
        self.max_model_len = engine.max_model_len
        self.vocab_size = engine.model.cfg.vocab_size
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._accepting = True
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="inferforge-llm-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, model_name: str | None = None, **config: Any
    ) -> AsyncLLMEngine:
        """`config` takes the fields of `EngineConfig` (device, dtype, quant, max_num_seqs, ...)."""
        return cls(LLMEngine(path, EngineConfig(**config)), model_name)

    # ---- EngineClient ----------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down; retry on another replica")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if request.request_id in self._streams:
                raise InferforgeError(
                    f"request id {request.request_id!r} is already in flight; use a unique id"
                )
            self.engine.add_request(request)
            self._streams[request.request_id] = stream
        self._wake.set()
        remaining = request.params.n
        try:
            while remaining:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            with self._lock:
                self._streams.pop(request.request_id, None)
                if remaining:
                    self.engine.abort(request.request_id)

    async def abort(self, request_id: str) -> None:
        with self._lock:
            outs = self.engine.abort(request_id)
        self._deliver(outs)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def encode(self, text: str) -> list[int]:
        return self.engine.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.engine.tokenizer.decode(token_ids)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.engine.tokenizer.apply_chat_template(messages, tools)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let in-flight requests finish for up to grace_s, abort the rest, stop the
        thread."""
        self._accepting = False
        deadline = time.monotonic() + max(grace_s, 0.0)
        while time.monotonic() < deadline and self.engine.has_unfinished():
            await asyncio.sleep(0.01)
        with self._lock:
            ids = [
                r.request.request_id for r in (*self.engine.scheduler.waiting, *self.engine.scheduler.running)
            ]
            outs = [o for rid in ids for o in self.engine.abort(rid)]
        self._deliver(outs)
        self._stop = True
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 10.0)

    # ---- the background loop ---------------------------------------------------------------------
    def _deliver(self, outs: list[EngineOutput] | list[tuple[str, BaseException]]) -> None:
        for out in outs:
            rid, item = (out.request_id, out) if isinstance(out, EngineOutput) else out
            stream = self._streams.get(rid)
            if stream is not None and not stream.loop.is_closed():
                # the client's event loop may close between the check and the call
                with contextlib.suppress(RuntimeError):
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)

    def _run(self) -> None:
        while not self._stop:
            self._wake.clear()
            with self._lock:
                busy = self.engine.has_unfinished()
                outs: list = []
                if busy:
                    try:
                        outs = self.engine.step()
                    except Exception as exc:  # a device fault must not leave clients hanging
                        outs = self._fail_all(exc)
            if busy:
                self._deliver(outs)
            else:
                self._wake.wait(0.5)

    def _fail_all(self, exc: Exception) -> list[tuple[str, BaseException]]:
        sched = self.engine.scheduler
        ids = [r.request.request_id for r in (*sched.waiting, *sched.running)]
        for rid in ids:
            self.engine.abort(rid)
        err = EngineStepError(f"engine step failed: {type(exc).__name__}: {exc}")
        return [(rid, err) for rid in ids]
