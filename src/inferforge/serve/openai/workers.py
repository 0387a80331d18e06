"""`serve-llm --api-server-count N`: N HTTP worker processes in front of one engine process.

Why: one HTTP process took requests one at a time at about 1 ms of CPU each and wrote every SSE chunk of 64
streams itself; on the H100 the server made 0.75-0.81 of the engine's tokens/s (docs/llm-runs.md, I8-I10).
vLLM answers this with `--api-server-count`; this is the same shape.

This process is the supervisor. It starts the engine (`ProcessEngine`, listening on a Unix socket in a private
folder, with a random key), binds the port once and spawns the workers, which share the listening socket
(the kernel hands each connection to one of them) and each link to the engine. A request's outputs go only
to the worker that added it. On SIGTERM or SIGINT the supervisor passes SIGTERM to every worker, which drains
its own requests exactly as a single-process server does, then stops the engine. A worker that dies is
replaced (the engine aborts that worker's requests when its link breaks); if the engine dies the server
exits with code 1, so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import multiprocessing as mp
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

from uvicorn.config import STARTUP_FAILURE

from inferforge.serve.openai.limits import ServerLimits

log = logging.getLogger("inferforge.serve")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# A worker's exit code when it could not start (no link to the engine, or uvicorn's own startup failure, which
# exits with the same code): replacing it would fail the same way, so the server stops instead.
STARTUP_FAILED = STARTUP_FAILURE
_EXTRA_DRAIN_S = 10.0  # after the drain period, how long a worker gets to close before it is killed


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent to it at spawn (so it pickles: no engine, no app)."""

    folder: str
    model_name: str | None
    limits: ServerLimits
    api_keys: frozenset[str] | None
    drain_timeout: float
    log_level: str
    switch_interval_ms: float
    engine_address: str
    engine_key: bytes
    metrics_dir: str
    stream_interval: int = 1
    prefix_cache_per_key: bool = True


def _worker_main(sock: socket.socket, spec: WorkerSpec) -> None:
    from prometheus_client import multiprocess

    from inferforge.serve.openai.engine_process import connect_engine
    from inferforge.serve.openai.server import serve

    # A worker that exits leaves the live gauges; its counters and histograms stay in the totals.
    atexit.register(multiprocess.mark_process_dead, os.getpid(), spec.metrics_dir)
    try:
        link = connect_engine(spec.engine_address, spec.engine_key, spec.folder, model_name=spec.model_name)
    except Exception as exc:
        print(
            f"worker {os.getpid()}: cannot link to the engine: {type(exc).__name__}: {exc}", file=sys.stderr
        )
        sys.exit(STARTUP_FAILED)
    serve(
        link,
        model_name=spec.model_name,
        limits=spec.limits,
        api_keys=set(spec.api_keys) if spec.api_keys is not None else None,
        drain_timeout=spec.drain_timeout,
        log_level=spec.log_level,
        switch_interval_ms=spec.switch_interval_ms,
        sockets=[sock],
        multiprocess_dir=spec.metrics_dir,
        stream_interval=spec.stream_interval,
        prefix_cache_per_key=spec.prefix_cache_per_key,
    )


def bind(host: str, port: int) -> socket.socket:
    """The listening socket all workers share, bound once here (as uvicorn's own supervisor does)."""
    import uvicorn

    return uvicorn.Config("inferforge:unused", host=host, port=port).bind_socket()


class _Signals:
    """First SIGTERM/SIGINT: drain and stop. A second SIGINT: kill the workers now."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.force = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._on)

    def _on(self, sig: int, frame: FrameType | None) -> None:
        if self.stop.is_set() and sig == signal.SIGINT:
            self.force = True
        self.stop.set()


def serve_workers(
    folder: str,
    engine_config: dict[str, Any],
    count: int,
    *,
    host: str,
    port: int,
    model_name: str | None,
    limits: ServerLimits,
    api_keys: set[str] | None,
    drain_timeout: float,
    log_level: str,
    switch_interval_ms: float,
    stream_interval: int = 1,
    prefix_cache_per_key: bool = True,
) -> int:
    """Run the engine and `count` HTTP workers until a signal; returns the process's exit code."""
    from inferforge.serve.openai.engine_process import ProcessEngine

    if count < 2:
        raise ValueError(f"serve_workers needs 2 or more workers, got {count}")
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(message)s")
    private = tempfile.mkdtemp(prefix="inferforge-llm-")  # 0700: only this user reaches the engine socket
    metrics_dir = os.path.join(private, "metrics")
    os.mkdir(metrics_dir)
    os.environ[MULTIPROC_ENV] = metrics_dir  # before any worker starts: prometheus-client reads it at import
    address, key = os.path.join(private, "engine.sock"), secrets.token_bytes(32)
    try:
        engine = ProcessEngine(folder, model_name=model_name, listen=(address, key), **engine_config)
        signals = _Signals()  # from here on: drain on a signal (while loading, Ctrl-C stops the load at once)
        keys = frozenset(api_keys) if api_keys is not None else None
        spec = WorkerSpec(folder, model_name, limits, keys, drain_timeout, log_level, switch_interval_ms,
                          address, key, metrics_dir, stream_interval, prefix_cache_per_key)  # fmt: skip
        sock = bind(host, port)
        code = _supervise(engine, spec, sock, count, signals)
        sock.close()
        asyncio.run(engine.shutdown(0.0))
        return code
    finally:
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(private, ignore_errors=True)


def _supervise(engine: Any, spec: WorkerSpec, sock: socket.socket, count: int, signals: _Signals) -> int:
    from prometheus_client import multiprocess

    ctx = mp.get_context("spawn")

    def spawn() -> Any:
        proc = ctx.Process(target=_worker_main, args=(sock, spec), name="inferforge-http-worker")
        proc.start()
        return proc

    workers = [spawn() for _ in range(count)]
    log.info("%d HTTP workers (pids %s) in front of engine pid %s", count,
             " ".join(str(p.pid) for p in workers), engine.pid)  # fmt: skip
    code = 0
    while not signals.stop.wait(0.2):
        if not engine.is_alive():
            log.error("the engine process exited; stopping the server")
            code = 1
            break
        for i, proc in enumerate(workers):
            if proc.is_alive():
                continue
            if proc.exitcode == STARTUP_FAILED:
                log.error("HTTP worker %s could not start; stopping the server", proc.pid)
                code = 1
                signals.stop.set()
                break
            log.warning("HTTP worker %s exited with %s; starting another", proc.pid, proc.exitcode)
            multiprocess.mark_process_dead(proc.pid, spec.metrics_dir)  # killed: its atexit never ran
            workers[i] = spawn()
    _stop_workers(workers, spec.drain_timeout + _EXTRA_DRAIN_S, signals)
    return code


def _stop_workers(workers: list[Any], timeout_s: float, signals: _Signals) -> None:
    """SIGTERM each worker (each drains its requests), wait for them, kill what outlives the deadline."""
    for proc in workers:
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while any(p.is_alive() for p in workers) and time.monotonic() < deadline and not signals.force:
        time.sleep(0.05)
    for proc in workers:
        if proc.is_alive():
            log.warning("HTTP worker %s did not stop in time; killing it", proc.pid)
            proc.kill()
        proc.join(5.0)
