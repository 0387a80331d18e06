"""`inferforge serve`: build the engine, repository and V2 app from one config, and run it under uvicorn.

Shutdown is graceful: on SIGTERM or Ctrl-C the server stops accepting connections and answers new requests on
open connections with 503, lets in-flight requests finish (up to `graceful_timeout_s`), then drains the
queues."""

from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from inferforge.errors import InferforgeError
from inferforge.serve.repository import Loader, VersionPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerConfig:
    """Everything `inferforge serve` takes; the CLI flags are these fields."""

    model_path: str
    """An artifact folder, a run folder, or a repository `repo/<model>/<version>/`."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    api_key_file: str | None = None
    """File with one bearer API key per line; when given, inference and management need one."""
    enable_model_control: bool = False
    """Turn on the repository's load/unload endpoints (needs --api-key-file)."""
    enable_shared_memory: bool = False
    """Turn on the system shared-memory extension (tensors in /dev/shm regions that clients register)."""
    version_policy: str = "latest:1"
    """Versions served per model: latest:N, specific:1,3 or all."""
    device: str | None = None
    """Device to load models on (cuda, cuda:1, cpu); default: what each artifact was built for."""
    instances: int = 1
    """Model instances per version and device, each with its own worker thread."""
    max_batch_size: int | None = None
    """Most rows per batch; default: the artifact's batching hint."""
    max_queue_delay_us: int = 0
    """How long a request may wait for others to join its batch, in microseconds."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Batch sizes the batcher stops at when it can (comma-separated on the command line)."""
    max_queue_size: int = 512
    """Most requests waiting per model version before new ones get 503 with Retry-After."""
    timeout_s: float = 30.0
    """Deadline of a request that sets none (its own `timeout` parameter, in microseconds, may shorten it)."""
    max_body_mib: float = 64.0
    """Largest request body accepted, in MiB."""
    graceful_timeout_s: float = 30.0
    """How long shutdown waits for in-flight requests."""
    http_workers: int = 1
    """Server processes sharing the port, each with its own models and queues: raises the ceiling of Python
    HTTP parsing for large tensors; no model control. /metrics sums the processes (multiprocess mode)."""
    loader: str | None = None
    """`package.module:function` that loads a servable like `registry.load_servable` (the default)."""

    def __post_init__(self) -> None:
        if not Path(self.model_path).is_dir():
            raise InferforgeError(
                f"model path {self.model_path!r} is not a folder; pass an artifact, run or repo"
            )
        if not 0 <= self.port <= 65535:
            raise InferforgeError(f"--port {self.port} must lie in 0..65535")
        if self.enable_model_control and not self.api_key_file:
            raise InferforgeError(
                "--enable-model-control needs --api-key-file: load/unload always need an API key"
            )
        if self.api_key_file and not Path(self.api_key_file).is_file():
            raise InferforgeError(f"--api-key-file {self.api_key_file!r} does not exist")
        if self.instances < 1 or self.max_queue_size < 1 or self.timeout_s <= 0 or self.max_body_mib <= 0:
            raise InferforgeError(
                "--instances, --max-queue-size, --timeout-s and --max-body-mib must be positive"
            )
        if self.http_workers < 1:
            raise InferforgeError(f"--http-workers {self.http_workers} must be >= 1")
        if self.http_workers > 1 and self.enable_shared_memory:
            raise InferforgeError(
                "--http-workers > 1 cannot be combined with --enable-shared-memory: a region registered "
                "with one process would be unknown to the others"
            )
        if self.http_workers > 1 and self.enable_model_control:
            raise InferforgeError(
                "--http-workers > 1 cannot be combined with --enable-model-control: each "
                "process holds its own models, so a load or unload would reach only one"
            )
        VersionPolicy.parse(self.version_policy)

    def api_keys(self) -> frozenset[str]:
        if not self.api_key_file:
            return frozenset()
        keys = frozenset(
            line.strip()
            for line in Path(self.api_key_file).read_text().splitlines()
            if line.strip() and not line.startswith("#")
        )
        if not keys:
            raise InferforgeError(f"--api-key-file {self.api_key_file!r} holds no keys (one per line)")
        return keys


def resolve_loader(spec: str | None) -> Loader:
    if spec is None:
        from inferforge.registry import load_servable  # type: ignore[attr-defined]

        return load_servable  # type: ignore[no-any-return]
    module_name, _, attr = spec.partition(":")
    try:
        return getattr(importlib.import_module(module_name), attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise InferforgeError(
            f"--loader {spec!r} cannot be imported ({exc}); use package.module:function"
        ) from None


def build_app(  # type: ignore[no-untyped-def]
    config: ServerConfig, loader: Loader | None = None, multiprocess_dir: str | None = None
):
    """The FastAPI app for a config (models load when the app starts); `multiprocess_dir` is set in the
    processes of an `--http-workers` server, whose metrics then cover all of them."""
    from inferforge.serve.engine import Engine
    from inferforge.serve.http.app import HttpOptions, create_app
    from inferforge.serve.metrics import ServeMetrics
    from inferforge.serve.repository import ModelRepository

    metrics = ServeMetrics(multiprocess_dir)
    engine = Engine(observer=metrics)
    batching: dict[str, object] = {
        "instances": config.instances,
        "max_batch_size": config.max_batch_size,
        "max_queue_delay_us": config.max_queue_delay_us,
        "max_queue_size": config.max_queue_size,
        "timeout_s": config.timeout_s,
        "preferred_batch_sizes": config.preferred_batch_sizes or None,
    }
    repository = ModelRepository(
        config.model_path,
        engine,
        loader or resolve_loader(config.loader),
        policy=VersionPolicy.parse(config.version_policy),
        device=config.device,
        batching=batching,
    )
    options = HttpOptions(
        api_keys=config.api_keys(),
        model_control=config.enable_model_control,
        shared_memory=config.enable_shared_memory,
        max_body_bytes=int(config.max_body_mib * 1024 * 1024),
        workers=config.http_workers if multiprocess_dir else 1,
        shared_dir=multiprocess_dir,
    )
    return create_app(engine, repository, metrics, options)


def serve(config: ServerConfig, loader: Loader | None = None) -> None:
    """Run until SIGINT/SIGTERM, then shut down gracefully."""
    import uvicorn

    from inferforge.serve.http.protocol import protocol_spec

    if config.http_workers > 1:
        # uvicorn's supervisor binds the port and spawns the processes; each builds its app from the config.
        # prometheus-client picks file-backed values when first imported, so the folder must be in the
        # environment before the workers start; a fresh one per server keeps an earlier run's (or another
        # server's) counts out of this one's totals.
        metrics_dir = tempfile.mkdtemp(prefix="inferforge-metrics-")
        os.environ[_CONFIG_ENV] = json.dumps(dataclasses.asdict(config))
        os.environ[MULTIPROC_ENV] = metrics_dir
        try:
            uvicorn.run(
                f"{__name__}:app_from_env",
                factory=True,
                workers=config.http_workers,
                http=protocol_spec(),
                proxy_headers=False,  # nothing reads the client address; saves a middleware per request
                host=config.host,
                port=config.port,
                log_level="warning",
                access_log=False,
                timeout_graceful_shutdown=int(config.graceful_timeout_s),
            )
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        return
    app = build_app(config, loader)  # its lifespan marks it draining on SIGINT/SIGTERM
    uv_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=int(config.graceful_timeout_s),
        lifespan="on",
        http=protocol_spec(),
        proxy_headers=False,
    )
    uvicorn.Server(uv_config).run()


_CONFIG_ENV = "INFERFORGE_SERVE_CONFIG"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def app_from_env():  # type: ignore[no-untyped-def]
    """The app of one `--http-workers` process, from the config its parent left in the environment."""
    from prometheus_client import multiprocess

    fields = json.loads(os.environ[_CONFIG_ENV])
    fields["preferred_batch_sizes"] = tuple(fields["preferred_batch_sizes"])
    metrics_dir = os.environ[MULTIPROC_ENV]
    # A process that exits (shutdown, or uvicorn replacing it) drops out of the live gauges; its counters
    # and histograms stay in the totals, as counters must.
    atexit.register(multiprocess.mark_process_dead, os.getpid(), metrics_dir)
    return build_app(ServerConfig(**fields), multiprocess_dir=metrics_dir)
