"""The engine: the model versions being served, and the one door requests come in by.

Protocol adapters (the V2 HTTP app, tests, a future gRPC front end) call `infer` or `submit`; nothing here
knows about HTTP. A request is always answered: with outputs, or with one of the errors in `errors.py`."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future

from inferforge.registry.servable import Servable
from inferforge.serve.engine.errors import DeadlineExceeded, ModelNotReady, ShuttingDown
from inferforge.serve.engine.runner import EngineObserver, ModelRunner
from inferforge.serve.engine.types import BatcherConfig, InferRequest, InferResponse

_EXPIRED = object()


def _settle(waiter: asyncio.Future[object], outcome: object) -> None:
    if not waiter.done():
        waiter.set_result(outcome)


def version_order(version: str) -> tuple[int, int | str]:
    """Numeric versions sort as numbers, others after them by name."""
    return (0, int(version)) if version.isdigit() else (1, version)


class Engine:
    """Owns one `ModelRunner` per served (model, version)."""

    def __init__(self, observer: EngineObserver | None = None) -> None:
        self._observer = observer
        self._runners: dict[tuple[str, str], ModelRunner] = {}
        self._lock = threading.Lock()
        self._closing = False

    def add(self, instances: Sequence[Servable], config: BatcherConfig) -> ModelRunner:
        runner = ModelRunner(instances, config, self._observer)
        with self._lock:
            old = self._runners.get((runner.name, runner.version))
            self._runners[(runner.name, runner.version)] = runner
        if old is not None:
            old.close()
        return runner

    def remove(self, name: str, version: str, drain_timeout_s: float = 30.0) -> None:
        """Stop routing to the version at once; requests already queued still finish."""
        with self._lock:
            runner = self._runners.pop((name, version), None)
        if runner is not None:
            runner.close(drain=True, timeout_s=drain_timeout_s)

    def runner(self, name: str, version: str | None = None) -> ModelRunner:
        """The named version, or the highest version served when none is named."""
        with self._lock:
            if version:
                found = self._runners.get((name, version))
            else:
                versions = [v for (n, v) in self._runners if n == name]
                found = self._runners[(name, max(versions, key=version_order))] if versions else None
        if found is None:
            which = f"version {version} of " if version else ""
            raise ModelNotReady(f"{which}model {name!r} is not loaded; load it or check the repository index")
        return found

    def served(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted(self._runners, key=lambda k: (k[0], version_order(k[1])))

    def submit(self, name: str, version: str | None, request: InferRequest) -> Future[InferResponse]:
        if self._closing:
            raise ShuttingDown(
                "the server is shutting down and takes no new requests; retry on another replica"
            )
        return self.runner(name, version).submit(request)

    async def infer(self, name: str, version: str | None, request: InferRequest) -> InferResponse:
        """Await the answer without blocking the loop; past the deadline it raises `DeadlineExceeded`.

        One loop future, settled from the worker thread through `call_soon_threadsafe`, and one timer: the
        fewest hops between the worker and the loop (`asyncio.wait_for(wrap_future(...))` adds a second
        future and a task switch per request)."""
        future = self.submit(name, version, request)
        assert request.deadline is not None  # set by submit
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[object] = loop.create_future()

        def deliver(done: Future[InferResponse]) -> None:  # in the worker thread (or here, if already done)
            if not loop.is_closed():
                loop.call_soon_threadsafe(_settle, waiter, done)

        timer = loop.call_later(max(request.deadline - time.monotonic(), 0.0), _settle, waiter, _EXPIRED)
        future.add_done_callback(deliver)
        try:
            outcome = await waiter
        except asyncio.CancelledError:
            future.cancel()
            raise
        finally:
            timer.cancel()
        if outcome is _EXPIRED:
            future.cancel()  # frees its queue slot if it has not started; a running batch just discards it
            raise DeadlineExceeded(
                f"request {request.id!r} to model {name!r} was not answered within its deadline "
                f"({request.deadline - request.arrival:.3f} s); raise the timeout or lower the load"
            )
        return future.result()  # the engine's own error, if the batch failed or expired in the queue

    def shutdown(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, finish the queued ones, free every model."""
        self._closing = True
        for name, version in self.served():
            self.remove(name, version, drain_timeout_s)
