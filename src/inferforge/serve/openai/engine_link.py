"""An `EngineClient` over one connection to the engine process, and the wire format the two ends share.

The engine process (`engine_process.py`) steps `LLMEngine` alone and sends each step's outputs to every
connection that owns some of them, one message per connection and step. On this side a reader thread hands a
message's outputs to the event loop in one call. Tokenization stays on this side (the same tokenizer class as
the engine's), so the engine process only ever sees token ids. One process running the HTTP app holds one
link: the server of `--api-server-count 1` through the pipe to the child it spawned, each worker of a larger
server through a socket to the engine its supervisor started.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from inferforge.errors import InferforgeError
from inferforge.llm.detok import IncrementalDetokenizer
from inferforge.llm.protocol import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestTiming,
    merge_outputs,
)

_ERRORS: dict[str, type[InferforgeError]] = {}
_STATS_TIMEOUT_S = 2.0


def _error(kind: str, message: str) -> InferforgeError:
    """The engine's refusal with its class name (QueueFullError, ...), which the app maps to a status."""
    cls = _ERRORS.get(kind)
    if cls is None:
        cls = _ERRORS[kind] = type(kind, (InferforgeError,), {})
    return cls(message)


class EngineClosedError(InferforgeError):
    """The engine is shutting down and takes no new requests."""


class EngineProcessError(RuntimeError):
    """The engine process died or a step failed; every in-flight request gets this."""


def pack_full(o: EngineOutput) -> tuple:
    return (o.request_id, o.index, o.new_token_ids, o.new_text, o.logprobs, o.finished, o.finish_reason,
            o.prompt_tokens, o.completion_tokens, o.timing.arrival, o.timing.scheduled, o.timing.first_token,
            o.timing.finished, o.prompt_logprobs)  # fmt: skip


def pack(outs: list[EngineOutput]) -> list[tuple]:
    """Plain tuples pickle several times faster than dataclasses; this runs between two GPU steps, in the one
    engine process. A sequence's first delta and its last go whole; a delta between them with no text and no
    logprobs goes as (request id, index, token ids, completion tokens), and the link takes the prompt length
    and timing from the request's first: 4 fields instead of 14 for nearly every output of a decode step."""
    return [pack_full(o) if _whole(o) else (o.request_id, o.index, o.new_token_ids, o.completion_tokens)
            for o in outs]  # fmt: skip


def _whole(o: EngineOutput) -> bool:
    first = o.completion_tokens == len(o.new_token_ids)
    return first or o.finished or bool(o.new_text) or o.logprobs is not None or o.prompt_logprobs is not None


@dataclass
class _Stream:
    """A request in flight on this link: where its outputs go, and what its compact deltas leave out."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[Any]
    prompt_tokens: int = 0
    timing: RequestTiming | None = None


class EngineLink:
    """`EngineClient` over `conn`, whose far end is the engine process's loop.

    `hello` is the engine's ("ready", max_model_len, vocab_size, stats) message; `describe_exit` words why the
    link broke (the child's exit code, for the process that spawned it)."""

    def __init__(
        self,
        conn: Any,
        folder: str | Path,
        hello: tuple,
        *,
        model_name: str | None = None,
        tokenizer: Any = None,
        describe_exit: Callable[[], str] = lambda: "the connection closed",
    ) -> None:
        from inferforge.llm.detok import Tokenizer

        self.folder = Path(folder)
        self.model_name = model_name or self.folder.name
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer(self.folder)
        _, self.max_model_len, self.vocab_size, self._stats = hello
        self._conn = conn
        self._describe_exit = describe_exit
        self._streams: dict[str, _Stream] = {}
        self._send_lock = threading.Lock()
        self._accepting = True
        self._dead = False
        self._bye = threading.Event()
        self._stats_seen = threading.Condition()
        self._stats_serial = 0
        self._reader = threading.Thread(target=self._read, name="inferforge-engine-reader", daemon=True)
        self._reader.start()

    # ---- EngineClient -----------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._dead:
            gone = self._describe_exit()
            raise EngineClosedError(f"the engine process is gone ({gone}); restart the server")
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down; retry on another replica")
        if request.request_id in self._streams:
            raise InferforgeError(f"request id {request.request_id!r} is already in flight; use a unique id")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request.request_id] = _Stream(asyncio.get_running_loop(), queue)
        remaining = request.params.n
        texts = _texts_here(request, self.tokenizer)
        params = request.params
        if texts is not None:
            request = replace(request, params=replace(params, detokenize=False, stop=()))
        stopped_here = False
        ended_here: set[int] = set()  # sequences of an n > 1 request stopped here by a stop string
        try:
            self._send(("add", request))
            while remaining:
                items = [await queue.get()]
                if not queue.empty():  # the HTTP side is behind: fold what waits into fewer deltas
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    items = _coalesce(items)
                for item in items:
                    if isinstance(item, BaseException):
                        raise item
                    if item.index in ended_here:
                        continue  # made by the engine before it heard of the stop: dropped
                    if texts is not None and _add_text(item, texts[item.index], params.min_tokens):
                        if params.n == 1:
                            stopped_here = True
                        else:
                            ended_here.add(item.index)
                            self._send(("stop_seq", request.request_id, item.index))
                    if item.finished:
                        remaining -= 1
                    yield item
                    if not remaining:
                        break  # anything after a sequence's end (a step past a stop string) is dropped
        finally:
            self._streams.pop(request.request_id, None)
            if remaining or stopped_here:  # stopped here: the engine still runs it until told
                with contextlib.suppress(OSError):
                    self._send(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(OSError):
            self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        """The figures that came with the last message; `refresh_stats` asks the engine for current ones."""
        return self._stats

    async def refresh_stats(self) -> EngineStats:
        """Current figures from the engine (answered between two steps). Outputs come only to the link that
        owns them, so a link whose requests ended earlier would otherwise report that moment's figures."""
        if self._dead:
            return self._stats
        with self._stats_seen:
            serial = self._stats_serial
        with contextlib.suppress(OSError):
            self._send(("stats",))
            await asyncio.to_thread(self._wait_stats, serial)
        return self._stats

    def _wait_stats(self, serial: int) -> None:
        with self._stats_seen:
            self._stats_seen.wait_for(lambda: self._stats_serial > serial or self._dead, _STATS_TIMEOUT_S)

    def is_alive(self) -> bool:
        """False once the engine is gone: /health turns 503 so an orchestrator restarts the server."""
        return not self._dead

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.tokenizer.apply_chat_template(messages, tools)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let in-flight requests run for up to grace_s, then tell the engine this link is
        done: it aborts the link's remaining requests and answers "bye"."""
        self._accepting = False
        deadline = time.monotonic() + max(grace_s, 0.0)
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with contextlib.suppress(OSError):
            self._send(("shutdown",))
        await asyncio.to_thread(self._bye.wait, 10.0)

    # ---- the connection ---------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._dead = True
                self._fail_all(EngineProcessError(f"the engine process is gone ({self._describe_exit()})"))
                break
            kind = msg[0]
            if kind == "outs":
                if msg[2] is not None:
                    self._stats = msg[2]
                self._deliver(self._unpack(msg[1]))
            elif kind == "stats":
                with self._stats_seen:
                    self._stats = msg[1]
                    self._stats_serial += 1
                    self._stats_seen.notify_all()
            elif kind == "reject":
                self._deliver([(msg[1], _error(msg[2], msg[3]))])
            elif kind == "fail":  # the engine's last word on this link
                self._dead = True
                self._fail_all(EngineProcessError(msg[1]))
                break
            elif kind == "bye":
                self._bye.set()
                break

    def _unpack(self, rows: list[tuple]) -> list[tuple[str, Any]]:
        """Outputs of the requests still streaming here (see `pack`); a compact delta takes the prompt length
        and timing its request's first delta brought."""
        items = []
        for r in rows:
            stream = self._streams.get(r[0])
            if stream is None:  # its client is gone: nothing to deliver to
                continue
            if len(r) == 4:
                if stream.timing is None:  # cannot happen with `pack`; fail the request, not the reader
                    items.append((r[0], EngineProcessError(f"a delta of {r[0]!r} came before its first")))
                    continue
                out = EngineOutput(r[0], r[1], r[2], "", None, False, None, stream.prompt_tokens, r[3],
                                   stream.timing)  # fmt: skip
            else:
                stream.prompt_tokens, stream.timing = r[7], RequestTiming(*r[9:13])
                out = EngineOutput(*r[:9], stream.timing, r[13])  # type: ignore[call-arg]
            items.append((r[0], out))
        return items

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """One hand-off per event loop and message, not one per output: the loop wakes once a step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, exc: BaseException) -> None:
        self._deliver([(rid, exc) for rid in list(self._streams)])
        self._bye.set()
        with self._stats_seen:
            self._stats_seen.notify_all()


def _texts_here(request: EngineRequest, tokenizer: Any) -> list[IncrementalDetokenizer] | None:
    """Detokenizers for a request whose text this side makes (None: the engine makes it).

    Detokenizing is per token and per sequence; here it runs in the HTTP worker processes, which scale out,
    instead of the one engine process (as vLLM's v1 moved it out of its engine core). A stop string found here
    ends the sequence here and aborts it in the engine, which may have run a step or two past it (their tokens
    are dropped). With n > 1 only that sequence ends: the engine is told to stop it and the others go on.
    """
    p = request.params
    if not p.detokenize:
        return None
    return [IncrementalDetokenizer(tokenizer, p.stop, p.skip_special_tokens) for _ in range(p.n)]


def _add_text(out: EngineOutput, detok: IncrementalDetokenizer, min_tokens: int) -> bool:
    """Fill in the delta's text as the engine would have; True when a stop string ends the sequence in it."""
    first = out.completion_tokens - len(out.new_token_ids)  # the sequence's tokens before this delta
    for i, token in enumerate(out.new_token_ids):
        if detok.add(token, check_stop=first + i + 1 >= min_tokens):
            _end_at(out, i, first)
            out.new_text = detok.pop(final=True)
            return True
    out.new_text = detok.pop(final=out.finished)
    return False


def _end_at(out: EngineOutput, i: int, first: int) -> None:
    """The sequence stops at the delta's i-th token, as the engine stops; what it made after is dropped."""
    out.new_token_ids = out.new_token_ids[: i + 1]
    if out.logprobs is not None:
        out.logprobs = out.logprobs[: i + 1]
    out.completion_tokens = first + i + 1
    out.finished, out.finish_reason = True, "stop"
    if out.timing.finished is None:
        out.timing.finished = time.monotonic()  # the engine's clock: CLOCK_MONOTONIC, one per machine


def _coalesce(items: list[Any]) -> list[Any]:
    """Merge consecutive deltas of the same sequence: one SSE chunk instead of several when the loop lags."""
    out: list[Any] = []
    for item in items:
        prev = out[-1] if out else None
        if (
            isinstance(item, EngineOutput)
            and isinstance(prev, EngineOutput)
            and prev.index == item.index
            and not prev.finished
        ):
            out[-1] = merge_outputs(prev, item)
        else:
            out.append(item)
    return out


def _put_all(batch: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
