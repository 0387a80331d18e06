"""An `EngineClient` whose `LLMEngine` steps in a child process: the HTTP loop and the engine share no GIL.

With the engine in a thread of the server (`AsyncLLMEngine`), every SSE chunk the loop writes is Python
time the engine thread cannot use to schedule and launch its next step; at 64 streams that is a large share
of a GPU step. Here the child runs the step loop alone and sends each step's outputs to the parent as one
message; a reader thread in the parent hands them to the event loop in one call. Tokenization stays in the
parent (same tokenizer class as the engine's), so the child only ever sees token ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from inferforge.errors import InferforgeError
from inferforge.llm.protocol import EngineOutput, EngineRequest, EngineStats, RequestTiming
from inferforge.serve.heap import refreeze

_IDLE_POLL_S = 0.05
_ERRORS: dict[str, type[InferforgeError]] = {}


def _error(kind: str, message: str) -> InferforgeError:
    """The child's refusal with its class name (QueueFullError, ...), which the app maps to a status."""
    cls = _ERRORS.get(kind)
    if cls is None:
        cls = _ERRORS[kind] = type(kind, (InferforgeError,), {})
    return cls(message)


class EngineClosedError(InferforgeError):
    """The engine is shutting down and takes no new requests."""


class EngineProcessError(RuntimeError):
    """The engine process died or a step failed; every in-flight request gets this."""


def _pack(outs: list[EngineOutput]) -> list[tuple]:
    """Plain tuples pickle several times faster than dataclasses; this runs between two GPU steps."""
    return [
        (o.request_id, o.index, o.new_token_ids, o.new_text, o.logprobs, o.finished, o.finish_reason,
         o.prompt_tokens, o.completion_tokens, o.timing.arrival, o.timing.scheduled, o.timing.first_token,
         o.timing.finished)
        for o in outs
    ]  # fmt: skip


def _unpack(rows: list[tuple]) -> list[EngineOutput]:
    return [EngineOutput(*r[:9], RequestTiming(*r[9:])) for r in rows]  # type: ignore[call-arg]


class _LoopClock:
    """Cumulative seconds of the child's loop by phase, sent with each step's stats: where the engine
    process's one core goes (stepping the engine, reading requests, sending outputs, waiting for work)."""

    def __init__(self) -> None:
        self.seconds = {"step": 0.0, "ipc_in": 0.0, "ipc_out": 0.0, "idle": 0.0}
        self._mark = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self._mark
        self._mark = now

    def stats(self, eng: Any) -> EngineStats:
        return replace(eng.stats(), loop_seconds=tuple(self.seconds.items()))


def _handle(msg: tuple, eng: Any, conn: Any) -> bool:
    """One message from the parent; True when it asks the engine to shut down."""
    if msg[0] == "add":
        try:
            eng.add_request(msg[1])
        except Exception as exc:
            conn.send(("reject", msg[1].request_id, type(exc).__name__, str(exc)))
    elif msg[0] == "abort":
        conn.send(("outs", _pack(eng.abort(msg[1])), None))
    elif msg[0] == "shutdown":
        sched = eng.scheduler
        for rid in [r.request.request_id for r in (*sched.waiting, *sched.running)]:
            conn.send(("outs", _pack(eng.abort(rid)), None))
        return True
    return False


def _child_main(conn: Any, folder: str, config: dict[str, Any]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from inferforge.llm.engine import EngineConfig, LLMEngine

        eng = LLMEngine(folder, EngineConfig(**config))
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    # Frameworks, model and graphs stay alive for the process's life: out of the collector's full scans, each
    # of which walked ~400k objects (151 ms on the CPU box) and stalled a step when it came.
    refreeze()
    conn.send(("ready", eng.max_model_len, eng.model.cfg.vocab_size, eng.stats()))
    profile_path = os.environ.get("INFERFORGE_ENGINE_PROFILE")
    if not profile_path:
        _serve(conn, eng)
        return
    import cProfile  # where the engine process's one core goes, for diagnosis (docs/openai-server.md)

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        _serve(conn, eng)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


class _StepTrace:
    """Per loop turn, for diagnosis (`INFERFORGE_ENGINE_TRACE=path`, written as JSON lines at exit): when
    requests reached the engine and what each step did: (start as Unix time, requests added, step seconds,
    outputs, first tokens among them, running, waiting)."""

    def __init__(self, path: str) -> None:
        self.path, self.added = path, 0
        self.rows: list[tuple] = []

    def step(self, eng: Any, t0: float, outs: list[EngineOutput]) -> None:
        firsts = sum(o.completion_tokens == len(o.new_token_ids) for o in outs)
        sched = eng.scheduler
        self.rows.append((t0, self.added, time.time() - t0, len(outs), firsts, len(sched.running),
                          len(sched.waiting)))  # fmt: skip
        self.added = 0

    def write(self) -> None:
        import json

        Path(self.path).write_text("\n".join(json.dumps(r) for r in self.rows))


def _serve(conn: Any, eng: Any) -> None:
    """The child's loop: take the parent's messages, step the engine, send each step's outputs."""
    clock = _LoopClock()
    trace_path = os.environ.get("INFERFORGE_ENGINE_TRACE")
    trace = _StepTrace(trace_path) if trace_path else None
    try:
        _loop(conn, eng, clock, trace)
    finally:
        if trace is not None:
            trace.write()


def _loop(conn: Any, eng: Any, clock: _LoopClock, trace: _StepTrace | None) -> None:
    stopping = False
    while True:
        busy = eng.has_unfinished()
        handled = False
        while True:
            waiting = not (busy or handled)
            ready = conn.poll(_IDLE_POLL_S if waiting else 0)
            clock.lap("idle" if waiting else "ipc_in")
            if not ready:
                break
            try:
                msg = conn.recv()
            except EOFError:
                return  # the parent is gone
            handled = True
            if trace is not None and msg[0] == "add":
                trace.added += 1
            stopping = _handle(msg, eng, conn) or stopping
            clock.lap("ipc_in")
            busy = eng.has_unfinished()
        if busy:
            t0 = time.time()
            try:
                outs = eng.step()
            except Exception as exc:  # a device fault must not leave clients hanging
                conn.send(("fail", f"engine step failed: {type(exc).__name__}: {exc}"))
                return
            clock.lap("step")
            if trace is not None:
                trace.step(eng, t0, outs)
            conn.send(("outs", _pack(outs), clock.stats(eng)))
            clock.lap("ipc_out")
        elif handled:
            conn.send(("outs", [], clock.stats(eng)))
            clock.lap("ipc_out")
        if stopping and not eng.has_unfinished():
            conn.send(("bye",))
            return


class ProcessEngine:
    """`EngineClient` over a child process running `LLMEngine`; `config` takes `EngineConfig`'s fields."""

    def __init__(self, folder: str | Path, *, model_name: str | None = None, **config: Any) -> None:
        from inferforge.llm.detok import Tokenizer

        self.folder = Path(folder)
        self.model_name = model_name or self.folder.name
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, str(folder), config), daemon=True)
        self._proc.start()
        child.close()
        try:
            self.tokenizer = Tokenizer(self.folder)  # while the child loads the model
            hello = self._conn.recv()
        except EOFError as exc:
            raise EngineProcessError(
                f"the engine process exited with {self._proc.exitcode} while loading"
            ) from exc
        except BaseException:
            self._proc.kill()  # no orphan engine when the tokenizer (or a signal) stops the start
            raise
        if hello[0] == "error":
            raise _error(hello[1], hello[2])
        _, self.max_model_len, self.vocab_size, self._stats = hello
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._send_lock = threading.Lock()
        self._accepting = True
        self._dead = False
        self._bye = threading.Event()
        self._reader = threading.Thread(target=self._read, name="inferforge-engine-reader", daemon=True)
        self._reader.start()

    # ---- EngineClient -----------------------------------------------------------------------------------
    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        if self._dead:
            raise EngineClosedError(
                f"the engine process has exited (code {self._proc.exitcode}); restart the server"
            )
        if not self._accepting:
            raise EngineClosedError("the engine is shutting down; retry on another replica")
        if request.request_id in self._streams:
            raise InferforgeError(f"request id {request.request_id!r} is already in flight; use a unique id")
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        remaining = request.params.n
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
                    if item.finished:
                        remaining -= 1
                    yield item
        finally:
            self._streams.pop(request.request_id, None)
            if remaining:
                with contextlib.suppress(OSError):
                    self._send(("abort", request.request_id))

    async def abort(self, request_id: str) -> None:
        with contextlib.suppress(OSError):
            self._send(("abort", request_id))

    def stats(self) -> EngineStats:
        return self._stats

    def is_alive(self) -> bool:
        """False once the child has exited: /health turns 503 so an orchestrator restarts the server."""
        return not self._dead and self._proc.is_alive()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.apply_chat_template(messages)

    async def shutdown(self, grace_s: float) -> None:
        """Refuse new work, let in-flight requests run for up to grace_s, abort the rest, stop the child."""
        self._accepting = False
        deadline = time.monotonic() + max(grace_s, 0.0)
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        with contextlib.suppress(OSError):
            self._send(("shutdown",))
        await asyncio.to_thread(self._bye.wait, 10.0)
        await asyncio.to_thread(self._proc.join, 10.0)
        if self._proc.is_alive():
            self._proc.kill()

    # ---- the pipe ---------------------------------------------------------------------------------------
    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, OSError):
                self._dead = True
                self._fail_all(EngineProcessError(f"the engine process exited ({self._proc.exitcode})"))
                break
            kind = msg[0]
            if kind == "outs":
                if msg[2] is not None:
                    self._stats = msg[2]
                self._deliver([(o.request_id, o) for o in _unpack(msg[1])])
            elif kind == "reject":
                self._deliver([(msg[1], _error(msg[2], msg[3]))])
            elif kind == "fail":
                self._fail_all(EngineProcessError(msg[1]))
            elif kind == "bye":
                self._bye.set()
                break

    def _deliver(self, items: list[tuple[str, Any]]) -> None:
        """One hand-off per event loop and message, not one per output: the loop wakes once a step."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue[Any], Any]]] = {}
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, batch in by_loop.items():
            if not loop.is_closed():
                loop.call_soon_threadsafe(_put_all, batch)

    def _fail_all(self, exc: BaseException) -> None:
        self._deliver([(rid, exc) for rid in list(self._streams)])
        self._bye.set()


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
            lps = None if item.logprobs is None else (prev.logprobs or ()) + item.logprobs
            out[-1] = replace(item, new_token_ids=prev.new_token_ids + item.new_token_ids,
                              new_text=prev.new_text + item.new_text, logprobs=lps)  # fmt: skip
        else:
            out.append(item)
    return out


def _put_all(batch: list[tuple[asyncio.Queue[Any], Any]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)
