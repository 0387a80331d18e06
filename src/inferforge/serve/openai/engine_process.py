"""The engine process: `LLMEngine` stepping alone, so the HTTP loops and the engine share no GIL.

With the engine in a thread of the server (`AsyncLLMEngine`), every SSE chunk the loop writes is Python
time the engine thread cannot use to schedule and launch its next step; at 64 streams that is a large share
of a GPU step. Here the child runs the step loop alone. Its first connection is the pipe to the process that
spawned it (`ProcessEngine`); with `listen=` it also accepts connections from the HTTP worker processes of
`--api-server-count N` (`EngineLink`s), authenticated by a key only the supervisor hands out. Each request
belongs to the connection that added it; a step's outputs go to their owners, one message per connection.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import replace
from multiprocessing.connection import Listener, wait
from pathlib import Path
from typing import Any

from inferforge.llm.protocol import EngineOutput, EngineStats
from inferforge.serve.openai.engine_link import (
    EngineClosedError,
    EngineLink,
    EngineProcessError,
    _error,
    pack,
)

__all__ = ["EngineClosedError", "EngineProcessError", "ProcessEngine"]

_IDLE_POLL_S = 0.05
_STATS_EVERY_S = 0.25


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


class _Hub:
    """The engine process's connections and which one owns each request.

    `primary` is the pipe to the spawning process: its "shutdown" stops the engine and its loss ends the
    process. Any other connection is a worker's: its "shutdown" or its loss aborts only its own requests."""

    def __init__(self, primary: Any, eng: Any, clock: _LoopClock) -> None:
        self.primary, self.eng, self.clock = primary, eng, clock
        self.conns: list[Any] = [primary]
        self.owner: dict[str, list[Any]] = {}  # request id -> [connection, sequences not yet finished]
        self.joining: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.stopping = False
        self.trace: _StepTrace | None = None
        self.stats_sent: dict[Any, float] = {}  # when each connection last got the engine's stats

    def accept_forever(self, listener: Listener, hello: tuple) -> None:
        """On a thread: take workers' connections (a wrong key fails the handshake and is dropped)."""
        while True:
            try:
                conn = listener.accept()
                conn.send(hello)
            except Exception:  # AuthenticationError, or a peer gone mid-handshake: not one of ours
                continue
            self.joining.put(conn)

    def adopt(self) -> None:
        while not self.joining.empty():
            conn = self.joining.get()
            if self.stopping:
                conn.close()
            else:
                self.conns.append(conn)

    def take(self, busy: bool) -> set[Any]:
        """Read every waiting message (waiting up to the idle poll for the first one when not busy); the
        connections that sent something get an answer this turn even if no output is theirs."""
        touched: set[Any] = set()
        while True:
            idle = not (busy or touched)
            ready = wait(self.conns, _IDLE_POLL_S if idle else 0)
            self.clock.lap("idle" if idle else "ipc_in")
            if not ready:
                return touched
            for conn in ready:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    self.drop(conn, gone=True)
                    touched.discard(conn)
                    continue
                if self.handle(conn, msg):
                    touched.add(conn)
            self.clock.lap("ipc_in")
            busy = self.eng.has_unfinished()

    def handle(self, conn: Any, msg: tuple) -> bool:
        """One message; False when the connection is closed by it (it needs no answer)."""
        kind = msg[0]
        if kind == "add":
            req = msg[1]
            try:
                self.eng.add_request(req)
            except Exception as exc:
                conn.send(("reject", req.request_id, type(exc).__name__, str(exc)))
                return True
            self.owner[req.request_id] = [conn, req.params.n]
            if self.trace is not None:
                self.trace.added += 1
        elif kind == "abort":
            self.send_outs(self.eng.abort(msg[1]))
        elif kind == "stop_seq":  # the link found a stop string in one sequence of an n > 1 request
            if msg[1] in self.owner and self.eng.stop_sequence(msg[1], msg[2]):
                self.sequence_ended(msg[1])  # the engine sends no final output for it
        elif kind == "stats":
            conn.send(("stats", self.clock.stats(self.eng)))
        elif kind == "shutdown":
            if conn is self.primary:
                self.stop()
            else:
                self.drop(conn, gone=False)
                return False
        return True

    def sequence_ended(self, rid: str) -> None:
        """One more of the request's sequences is over; the last one ends its ownership."""
        entry = self.owner[rid]
        entry[1] -= 1
        if entry[1] <= 0:
            del self.owner[rid]

    def abort_owned(self, conn: Any | None) -> None:
        """Abort the requests of `conn` (all requests when None) and send their final outputs."""
        rids = [rid for rid, (c, _) in self.owner.items() if conn is None or c is conn]
        for rid in rids:
            self.send_outs(self.eng.abort(rid))
        for rid in rids:
            self.owner.pop(rid, None)

    def drop(self, conn: Any, gone: bool) -> None:
        """A worker left (gone: its connection broke) or said goodbye; its requests stop."""
        if conn is self.primary and gone:
            raise SystemExit(0)  # the spawning process is gone: nobody will stop this one
        self.conns.remove(conn)
        self.stats_sent.pop(conn, None)
        if gone:
            for rid in [rid for rid, (c, _) in self.owner.items() if c is conn]:
                self.eng.abort(rid)
                self.owner.pop(rid, None)
            return
        self.abort_owned(conn)
        conn.send(("bye",))
        conn.close()

    def stop(self) -> None:
        """The spawning process asked the engine to stop: abort everything; workers still linked are told."""
        self.stopping = True
        self.abort_owned(None)
        for conn in [c for c in self.conns if c is not self.primary]:
            with contextlib.suppress(OSError):
                conn.send(("fail", "the engine is shutting down"))
                conn.close()
            self.conns.remove(conn)

    def send_outs(self, outs: list[EngineOutput], to: set[Any] | None = None) -> None:
        """Each connection gets its own outputs in one message (and `to` gets one even without any).

        The engine's stats ride along only where they may have changed for the reader, a finished or aborted
        output, or at most every `_STATS_EVERY_S`: built and pickled per connection they cost more than the
        outputs' own bytes (40-70 us a step on the CPU box, `benchmarks/serve_openai/hub_cost.py`), and a
        scrape asks the engine for current ones anyway (`EngineLink.refresh_stats`)."""
        by_conn: dict[Any, list[EngineOutput]] = {c: [] for c in to or ()}
        ended: set[Any] = set()
        for o in outs:
            entry = self.owner.get(o.request_id)
            if entry is None:
                continue
            by_conn.setdefault(entry[0], []).append(o)
            if o.finished:
                ended.add(entry[0])
                self.sequence_ended(o.request_id)
        now = time.monotonic()
        stats = None
        for conn, mine in by_conn.items():
            if conn in ended or now - self.stats_sent.get(conn, 0.0) >= _STATS_EVERY_S:
                stats = stats or self.clock.stats(self.eng)
                self.stats_sent[conn] = now
                msg = ("outs", pack(mine), stats)
            else:
                msg = ("outs", pack(mine), None)
            with contextlib.suppress(OSError):  # a worker that just died: its EOF is read next turn
                conn.send(msg)

    def fail(self, message: str) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send(("fail", message))


def _child_main(conn: Any, folder: str, config: dict[str, Any], listen: tuple[str, bytes] | None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the engine stops
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from inferforge.llm.engine import EngineConfig, LLMEngine

        eng = LLMEngine(folder, EngineConfig(**config))
        listener = Listener(listen[0], "AF_UNIX", authkey=listen[1]) if listen else None
    except Exception as exc:
        conn.send(("error", type(exc).__name__, str(exc)))
        return
    # Frameworks, model and graphs stay alive for the process's life: the engine has frozen them out of the
    # collector's full scans (`EngineConfig.freeze_gc_heap`), each of which walked ~400k objects (151 ms on
    # the CPU box) and stalled a step when it came.
    print(f"inferforge engine process {os.getpid()}: {eng.kernel_summary()}", file=sys.stderr, flush=True)
    hello = ("ready", eng.max_model_len, eng.model.cfg.vocab_size, eng.stats())
    conn.send(hello)
    hub = _Hub(conn, eng, _LoopClock())
    if listener is not None:
        threading.Thread(target=hub.accept_forever, args=(listener, hello), daemon=True).start()
    profile_path = os.environ.get("INFERFORGE_ENGINE_PROFILE")
    if not profile_path:
        _serve(hub)
        return
    import cProfile  # where the engine process's one core goes, for diagnosis (docs/openai-server.md)

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        _serve(hub)
    finally:
        profiler.disable()
        profiler.dump_stats(profile_path)


def _serve(hub: _Hub) -> None:
    """The child's loop: take the connections' messages, step the engine, send each step's outputs."""
    trace_path = os.environ.get("INFERFORGE_ENGINE_TRACE")
    hub.trace = _StepTrace(trace_path) if trace_path else None
    try:
        _loop(hub)
    except SystemExit:
        pass
    finally:
        if hub.trace is not None:
            hub.trace.write()


def _loop(hub: _Hub) -> None:
    eng, clock, trace = hub.eng, hub.clock, hub.trace
    while True:
        hub.adopt()
        touched = hub.take(busy=eng.has_unfinished())
        if eng.has_unfinished():
            t0 = time.time()
            try:
                outs = eng.step()
            except Exception as exc:  # a device fault must not leave clients hanging
                hub.fail(f"engine step failed: {type(exc).__name__}: {exc}")
                return
            clock.lap("step")
            if trace is not None:
                trace.step(eng, t0, outs)
            hub.send_outs(outs, touched)
            clock.lap("ipc_out")
        elif touched:
            hub.send_outs([], touched)
            clock.lap("ipc_out")
        if hub.stopping and not eng.has_unfinished():
            hub.primary.send(("bye",))
            return


class ProcessEngine(EngineLink):
    """`EngineClient` over a child process running `LLMEngine`; `config` takes `EngineConfig`'s fields.

    With `listen=(socket path, key)` the child also accepts `connect_engine` links from other processes."""

    def __init__(
        self,
        folder: str | Path,
        *,
        model_name: str | None = None,
        listen: tuple[str, bytes] | None = None,
        **config: Any,
    ) -> None:
        from inferforge.llm.detok import Tokenizer

        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child, str(folder), config, listen), daemon=True)
        self._proc.start()
        child.close()
        try:
            tokenizer = Tokenizer(Path(folder))  # while the child loads the model
            hello = conn.recv()
        except EOFError as exc:
            raise EngineProcessError(
                f"the engine process exited with {self._proc.exitcode} while loading"
            ) from exc
        except BaseException:
            self._proc.kill()  # no orphan engine when the tokenizer (or a signal) stops the start
            raise
        if hello[0] == "error":
            raise _error(hello[1], hello[2])
        super().__init__(
            conn,
            folder,
            hello,
            model_name=model_name,
            tokenizer=tokenizer,
            describe_exit=lambda: f"exit code {self._proc.exitcode}",
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def is_alive(self) -> bool:
        return super().is_alive() and self._proc.is_alive()

    async def shutdown(self, grace_s: float) -> None:
        """Drain as a link does, then stop the child (the engine stops at its primary's "shutdown")."""
        import asyncio

        await super().shutdown(grace_s)
        await asyncio.to_thread(self._proc.join, 10.0)
        if self._proc.is_alive():
            self._proc.kill()


def connect_engine(
    address: str, authkey: bytes, folder: str | Path, *, model_name: str | None = None
) -> EngineLink:
    """A link to the engine a `ProcessEngine(listen=...)` started, from another process (an HTTP worker)."""
    from multiprocessing.connection import Client

    conn = Client(address, "AF_UNIX", authkey=authkey)
    hello = conn.recv()
    return EngineLink(conn, folder, hello, model_name=model_name)
