"""Run the app under uvicorn with a graceful drain.

On SIGTERM (or the first SIGINT) the server stops accepting connections, answers 503 to new requests on open
ones, lets in-flight requests finish for `drain_timeout` seconds, then cancels the rest (which aborts their
engine requests), shuts the engine down and returns, so the process exits 0. A second SIGINT forces the exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Generator
from types import FrameType
from typing import Any

import uvicorn

from inferforge.llm.protocol import EngineClient
from inferforge.serve.openai.app import create_app
from inferforge.serve.openai.limits import ServerLimits

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CANCEL_AFTER_ABORT_S = 2.0  # aborted requests get this long to send their last chunk before being cancelled


class DrainingServer(uvicorn.Server):
    """uvicorn's server, except that a signal marks the app as draining and is not re-raised at the end."""

    def __init__(
        self,
        config: uvicorn.Config,
        on_drain: Callable[[], None],
        abort_inflight: Callable[[], Coroutine[Any, Any, None]],
        drain_timeout: float,
    ) -> None:
        super().__init__(config)
        self.on_drain = on_drain
        self.abort_inflight = abort_inflight
        self.drain_timeout = drain_timeout

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """At the drain deadline abort what still runs, so those responses end cleanly (finish_reason "abort")
        before uvicorn's own, later, deadline cancels whatever is stuck."""
        self.on_drain()
        loop = asyncio.get_running_loop()
        timer = loop.call_later(self.drain_timeout, lambda: loop.create_task(self.abort_inflight()))
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
            return
        self.on_drain()
        self.should_exit = True


def serve(
    engine: EngineClient,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    limits: ServerLimits | None = None,
    api_keys: set[str] | None = None,
    drain_timeout: float = 30.0,
    log_level: str = "info",
    switch_interval_ms: float = 5.0,
    sockets: list[socket.socket] | None = None,
    multiprocess_dir: str | None = None,
    stream_interval: int = 1,
    prefix_cache_per_key: bool = True,
) -> None:
    """Serve until a signal, then drain; returns normally so the caller exits 0.

    The engine steps in a thread of this process, so it shares the GIL with the HTTP loop. When a GPU step
    ends, the engine thread waits for the GIL up to the interpreter's switch interval (5 ms by default) while
    the loop writes chunks: a stall of the whole batch. A shorter interval bounds that wait.

    `sockets`: already bound (a worker of `--api-server-count N` serves its supervisor's); `multiprocess_dir`:
    that server's Prometheus folder.
    """
    if drain_timeout < 0:
        raise ValueError(f"drain_timeout must be >= 0 seconds, got {drain_timeout}")
    if not 0.05 <= switch_interval_ms <= 100:
        raise ValueError(f"switch_interval_ms must be in [0.05, 100], got {switch_interval_ms}")
    sys.setswitchinterval(switch_interval_ms / 1e3)
    app = create_app(
        engine,
        model_name=model_name,
        limits=limits,
        api_keys=api_keys,
        multiprocess_dir=multiprocess_dir,
        stream_interval=stream_interval,
        prefix_cache_per_key=prefix_cache_per_key,
    )
    state = app.state.openai

    def on_drain() -> None:
        state.draining = True

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=drain_timeout + _CANCEL_AFTER_ABORT_S,  # type: ignore[arg-type]
        access_log=False,
        lifespan="on",
    )
    DrainingServer(config, on_drain, state.abort_inflight, drain_timeout).run(sockets=sockets)
