"""The KServe V2 / Open Inference Protocol over HTTP, plus Triton's repository extension and `/metrics`.

This module only adapts: it reads and checks bodies, asks the repository for state, hands requests to the
engine and turns its answers and errors into V2 responses. It never runs a model on the event loop."""

from __future__ import annotations

import asyncio
import hmac
import signal
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import inferforge
from inferforge.heap import refreeze
from inferforge.serve.engine import (
    Engine,
    InvalidRequest,
    ModelNotReady,
    ModelRunner,
    ServeError,
    ShuttingDown,
)
from inferforge.serve.http import errors
from inferforge.serve.http.infer import V2App
from inferforge.serve.metrics import ServeMetrics
from inferforge.serve.repository import ModelRepository, ModelState
from inferforge.serve.shm import SharedMemoryRegions
from inferforge.serve.workers import mark_ready, ready_workers


@dataclass(frozen=True)
class HttpOptions:
    """What the HTTP layer enforces on its own."""

    api_keys: frozenset[str] = frozenset()
    """Bearer tokens accepted for inference and management; empty: inference is open."""
    model_control: bool = False
    """Whether the repository's load and unload endpoints are on (they always need an API key)."""
    max_body_bytes: int = 64 * 1024 * 1024
    """Largest request body accepted; larger ones get 413 before they are read."""
    workers: int = 1
    """HTTP processes serving the port; above 1, readiness waits for all of them (see `serve/workers.py`)."""
    shared_dir: str | None = None
    """The folder the processes share (the metrics folder) where each marks itself ready."""
    shared_memory: bool = False
    """Whether the system shared-memory extension is on (`serve/shm.py`)."""

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        if self.model_control and not self.api_keys:
            raise ValueError("model control (load/unload) needs API keys: pass --api-key-file")


class ServerState:
    """Shared by the routes: the engine, the repository, the metrics, and whether the server is draining."""

    def __init__(
        self, engine: Engine, repository: ModelRepository, metrics: ServeMetrics, options: HttpOptions
    ) -> None:
        self.engine, self.repository, self.metrics, self.options = engine, repository, metrics, options
        self.draining = False
        self.shm = SharedMemoryRegions() if options.shared_memory else None

    def authorize(self, header: str | None, *, always: bool = False) -> None:
        """Check an `Authorization` header against the keys (only where keys are set, unless `always`)."""
        keys = self.options.api_keys
        if not keys and not always:
            return
        scheme, _, token = (header or "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not any(hmac.compare_digest(token, k) for k in keys):
            raise errors.Unauthorized("missing or unknown API key: send 'Authorization: Bearer <key>'")

    def runner_for(self, name: str, version: str | None) -> ModelRunner:
        """The runner of a READY version; `ModelNotFound` or `ModelNotReady` (with the reason) otherwise."""
        status = self.repository.status(name, version)
        if status.state is not ModelState.READY:
            detail = f": {status.reason}" if status.reason else ""
            raise ModelNotReady(
                f"model {name!r} version {status.version or '-'} is {status.state.value}{detail}"
            )
        return self.engine.runner(name, status.version)


def create_app(
    engine: Engine, repository: ModelRepository, metrics: ServeMetrics, options: HttpOptions | None = None
) -> V2App:
    """Build the app. Models load in a background thread at startup, so liveness answers while they do.
    Infer requests take a plain ASGI path (`infer.py`); FastAPI serves the other routes and the lifespan."""
    state = ServerState(engine, repository, metrics, options or HttpOptions())

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # type: ignore[no-untyped-def]
        loader = threading.Thread(
            target=_load_and_mark, args=(state,), name="serve-startup-load", daemon=True
        )
        loader.start()
        _drain_on_signals(state)
        yield
        state.draining = True
        await asyncio.to_thread(engine.shutdown)
        if state.shm is not None:
            state.shm.unregister()

    app = FastAPI(
        title="inferforge V2 server",
        version=inferforge.__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.serve = state
    app.add_exception_handler(ServeError, errors.serve_error_handler)
    app.add_exception_handler(StarletteHTTPException, errors.http_error_handler)
    app.add_exception_handler(RequestValidationError, errors.validation_error_handler)
    app.add_exception_handler(Exception, errors.internal_error_handler)
    _add_health_routes(app, state)
    _add_model_routes(app, state)
    _add_repository_routes(app, state)
    _add_shared_memory_routes(app, state)
    return V2App(app, state)


def _load_and_mark(state: ServerState) -> None:
    state.repository.load_all()
    refreeze()
    if state.options.workers > 1 and state.options.shared_dir and state.repository.ready():
        mark_ready(state.options.shared_dir)


def _drain_on_signals(state: ServerState) -> None:
    """Chain onto the server's SIGINT/SIGTERM handlers (uvicorn's, installed before startup): readiness turns
    503 and requests on open connections get 503 at once, while uvicorn lets those in flight finish."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous):
            continue

        def handler(signum: int, frame: object, previous=previous) -> None:  # type: ignore[no-untyped-def]
            state.draining = True
            previous(signum, frame)

        signal.signal(sig, handler)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise errors.PayloadTooLarge(
            f"request body of {declared} bytes is over the server's limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            raise errors.PayloadTooLarge(f"request body is over the server's limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _add_health_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v2/health/live")
    async def live() -> Response:
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        if state.draining:
            return errors.error_response(ShuttingDown("the server is shutting down"))
        if not state.repository.ready():
            return errors.error_response(
                ModelNotReady("models are still loading or failed to load; see the index")
            )
        options = state.options
        if options.workers > 1 and options.shared_dir:
            done = ready_workers(options.shared_dir)
            if done < options.workers:
                return errors.error_response(
                    ModelNotReady(
                        f"{done} of {options.workers} HTTP worker processes have loaded their models"
                    )
                )
        return Response(status_code=200)

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {
            "name": "inferforge",
            "version": inferforge.__version__,
            "extensions": ["binary_tensor_data", "model_repository", "statistics"]
            + (["system_shared_memory"] if state.shm is not None else []),
        }

    @app.get("/metrics")
    async def metrics() -> Response:
        ready = state.metrics.model_ready
        ready.clear()
        for row in state.repository.index():
            ready.labels(row.name, row.version).set(1.0 if row.state is ModelState.READY else 0.0)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)


def _add_model_routes(app: FastAPI, state: ServerState) -> None:
    def runner_for(request: Request, name: str, version: str | None) -> ModelRunner:
        state.authorize(request.headers.get("authorization"))
        return state.runner_for(name, version)

    def stats_of(versions: list[tuple[str, str]]) -> dict:
        rows = []
        for n, v in versions:
            try:
                rows.append(state.engine.runner(n, v).stats.to_json(n, v))
            except ModelNotReady:  # unloaded since it was listed
                continue
        return {"model_stats": rows}

    # Before the metadata route, which would take "stats" for a model name.
    @app.get("/v2/models/stats")
    async def all_stats(request: Request) -> dict:
        state.authorize(request.headers.get("authorization"))
        return stats_of(state.engine.served())

    @app.get("/v2/models/{name}/stats")
    @app.get("/v2/models/{name}/versions/{version}/stats")
    async def model_stats(request: Request, name: str, version: str | None = None) -> dict:
        """Triton's statistics extension (per process: each --http-workers process has its own models)."""
        state.authorize(request.headers.get("authorization"))
        if version:
            return stats_of([(name, state.runner_for(name, version).version)])
        served = [(n, v) for n, v in state.engine.served() if n == name]
        if not served:
            state.runner_for(name, None)  # raises the reason: unknown, loading, failed, unloaded
        return stats_of(served)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(request: Request, name: str, version: str | None = None) -> dict:
        servable = runner_for(request, name, version).servable
        versions = [v for (n, v) in state.engine.served() if n == name]
        return {
            "name": name,
            "versions": versions,
            "platform": servable.platform,
            "inputs": [s.to_json() for s in servable.inputs],
            "outputs": [s.to_json() for s in servable.outputs],
        }

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(request: Request, name: str, version: str | None = None) -> Response:
        runner_for(request, name, version)
        return Response(status_code=200)

    @app.get("/v2/models/{name}/config")
    @app.get("/v2/models/{name}/versions/{version}/config")
    async def model_config(request: Request, name: str, version: str | None = None) -> dict:
        runner = runner_for(request, name, version)
        s, cfg = runner.servable, runner.config

        def dims(spec) -> dict:  # type: ignore[no-untyped-def]
            kind = "STRING" if spec.datatype == "BYTES" else spec.datatype  # Triton's config name for BYTES
            return {"name": spec.name, "data_type": f"TYPE_{kind}", "dims": list(spec.shape[1:])}

        return {
            "name": name,
            "platform": s.platform,
            "backend": s.platform,
            "max_batch_size": cfg.max_batch_size,
            "input": [dims(x) for x in s.inputs],
            "output": [dims(x) for x in s.outputs],
            "dynamic_batching": {
                "preferred_batch_size": list(cfg.preferred_batch_sizes),
                "max_queue_delay_microseconds": cfg.max_queue_delay_us,
                "default_queue_policy": {
                    "max_queue_size": cfg.max_queue_size,
                    "default_timeout_microseconds": int(cfg.timeout_s * 1e6),
                },
            },
            "instance_group": [
                {"count": cfg.instances, "kind": "KIND_GPU" if "cuda" in s.device else "KIND_CPU"}
            ],
        }


def _add_repository_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v2/repository/index")
    async def index(request: Request) -> list[dict]:
        state.authorize(request.headers.get("authorization"))
        body = await _read_body(request, 64 * 1024)
        only_ready = False
        if body.strip():
            import json

            try:
                only_ready = bool(json.loads(body).get("ready", False))
            except (ValueError, AttributeError):
                raise InvalidRequest(
                    'the repository index body must be a JSON object like {"ready": true}'
                ) from None
        rows = state.repository.index()
        return [r.to_json() for r in rows if not only_ready or r.state is ModelState.READY]

    def control(request: Request) -> None:
        if not state.options.model_control:
            raise errors.Forbidden(
                "model load/unload is disabled; start the server with --enable-model-control"
            )
        state.authorize(request.headers.get("authorization"), always=True)
        if state.draining:
            raise ShuttingDown("the server is shutting down")

    @app.post("/v2/repository/models/{name}/load")
    async def load(request: Request, name: str) -> Response:
        control(request)
        body = await _read_body(request, 64 * 1024)
        if b'"config"' in body or b'"file:' in body:
            raise InvalidRequest(
                "loading with a config or file override is not supported; add a version folder"
            )
        await asyncio.to_thread(state.repository.load, name)
        await asyncio.to_thread(refreeze)
        failed = [
            s
            for s in state.repository.index()
            if s.name == name and s.state is not ModelState.READY and s.reason.startswith("failed")
        ]
        if failed:
            raise InvalidRequest(f"model {name!r} version {failed[0].version} {failed[0].reason}")
        return Response(status_code=200)

    @app.post("/v2/repository/models/{name}/unload")
    async def unload(request: Request, name: str) -> Response:
        control(request)
        await asyncio.to_thread(state.repository.unload, name)
        await asyncio.to_thread(refreeze)
        return Response(status_code=200)


def _add_shared_memory_routes(app: FastAPI, state: ServerState) -> None:
    """Triton's system shared-memory extension (status, register, unregister), so `tritonclient`'s
    `register_system_shared_memory` and friends work; off unless --enable-shared-memory."""

    def regions(request: Request) -> SharedMemoryRegions:
        state.authorize(request.headers.get("authorization"))
        if state.shm is None:
            raise errors.Forbidden(
                "the shared memory extension is off; start the server with --enable-shared-memory"
            )
        return state.shm

    @app.get("/v2/systemsharedmemory/status")
    @app.get("/v2/systemsharedmemory/region/{name}/status")
    async def shm_status(request: Request, name: str | None = None) -> list[dict]:
        return regions(request).status(name)

    @app.post("/v2/systemsharedmemory/region/{name}/register")
    async def shm_register(request: Request, name: str) -> Response:
        shm = regions(request)
        import json

        try:
            doc = json.loads(await _read_body(request, 64 * 1024))
        except (ValueError, UnicodeDecodeError):
            doc = None
        if not isinstance(doc, dict):
            raise InvalidRequest('register takes a JSON object {"key": ..., "offset": ..., "byte_size": ...}')
        shm.register(name, doc.get("key"), doc.get("offset", 0), doc.get("byte_size"))
        return Response(status_code=200)

    @app.post("/v2/systemsharedmemory/unregister")
    @app.post("/v2/systemsharedmemory/region/{name}/unregister")
    async def shm_unregister(request: Request, name: str | None = None) -> Response:
        regions(request).unregister(name)
        return Response(status_code=200)
