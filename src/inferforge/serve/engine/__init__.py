"""The serving engine: bounded queues, a dynamic batcher and worker threads. It imports no web framework."""

from inferforge.serve.engine.engine import Engine, version_order
from inferforge.serve.engine.errors import (
    DeadlineExceeded,
    InvalidRequest,
    ModelExecutionError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServeError,
    ShuttingDown,
)
from inferforge.serve.engine.runner import EngineObserver, ModelRunner
from inferforge.serve.engine.types import BatcherConfig, InferRequest, InferResponse

__all__ = [
    "BatcherConfig",
    "DeadlineExceeded",
    "Engine",
    "EngineObserver",
    "InferRequest",
    "InferResponse",
    "InvalidRequest",
    "ModelExecutionError",
    "ModelNotFound",
    "ModelNotReady",
    "ModelRunner",
    "Overloaded",
    "ServeError",
    "ShuttingDown",
    "version_order",
]
