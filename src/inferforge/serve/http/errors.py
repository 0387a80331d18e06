"""How engine and HTTP-level errors become V2 responses: `{"error": "<message>"}` and a fitting status."""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferforge.serve.engine import (
    DeadlineExceeded,
    InvalidRequest,
    ModelExecutionError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    ServeError,
    ShuttingDown,
)


class Unauthorized(ServeError):
    """Missing or unknown bearer token."""


class Forbidden(ServeError):
    """The endpoint is switched off on this server."""


class MethodNotAllowed(ServeError):
    """The route exists but not for this HTTP method."""


class PayloadTooLarge(ServeError):
    """The body is larger than the server's limit."""


STATUS: list[tuple[type[ServeError], int, str]] = [
    (InvalidRequest, 400, "invalid"),
    (Unauthorized, 401, "unauthorized"),
    (Forbidden, 403, "forbidden"),
    (ModelNotFound, 404, "not_found"),
    (MethodNotAllowed, 405, "invalid"),
    (PayloadTooLarge, 413, "too_large"),
    (Overloaded, 503, "rejected"),
    (ShuttingDown, 503, "shutting_down"),
    (ModelNotReady, 503, "unavailable"),
    (DeadlineExceeded, 504, "timeout"),
    (ModelExecutionError, 500, "error"),
]


def classify(exc: ServeError) -> tuple[int, str]:
    """The status code and the metrics outcome label of an error."""
    for cls, status, outcome in STATUS:
        if isinstance(exc, cls):
            return status, outcome
    return 400, "invalid"


def error_response(exc: ServeError) -> JSONResponse:
    status, _ = classify(exc)
    headers: dict[str, str] = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after_s)
    elif isinstance(exc, ShuttingDown | ModelNotReady):
        headers["Retry-After"] = "1"
    elif isinstance(exc, Unauthorized):
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse({"error": str(exc)}, status_code=status, headers=headers)


async def serve_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServeError)
    return error_response(exc)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"error": f"invalid request: {exc.errors()}"}, status_code=400)


async def internal_error_handler(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": f"internal server error: {type(exc).__name__}"}, status_code=500)
