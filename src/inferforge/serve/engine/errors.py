"""Why an inference request was not answered with outputs.

The engine raises these; each protocol adapter maps them to its own status codes and error shape, so the
engine never speaks HTTP. Messages name the model, the tensor or the limit at fault, and the fix where one
exists."""

from __future__ import annotations

from inferforge.errors import InferforgeError


class ServeError(InferforgeError):
    """Base of the errors a serving request can end in."""


class InvalidRequest(ServeError):
    """The request does not fit the model's declared signature (names, datatypes, shapes, batch size)."""


class ModelNotFound(ServeError):
    """No model or version of that name exists in the repository."""


class ModelNotReady(ServeError):
    """The model exists but is loading, unloading, unloaded or failed to load."""


class Overloaded(ServeError):
    """The model's queue is full; the client should retry after `retry_after_s` seconds."""

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class DeadlineExceeded(ServeError):
    """The request's deadline passed before its outputs were ready."""


class ShuttingDown(ServeError):
    """The server is draining for shutdown and takes no new requests."""


class ModelExecutionError(ServeError):
    """The model raised while running a batch (not the client's fault; answered as a server error)."""
