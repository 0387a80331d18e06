"""The infer route as a plain ASGI handler, in front of the FastAPI app that serves every other route.

Why not a FastAPI route: at low load the server's fixed cost per request is what a client sees on top of the
model, and FastAPI's routing (a regex per route), dependency solving, `Request` and `Response` objects and
Starlette's body stream took about 0.2 ms of the 1.3 ms it was on a 2-core CPU (time stamps at each hop with
`benchmarks/serve/overhead_cpu.py`'s workload, see docs/serve.md). This handler reads the ASGI messages
directly and keeps the protocol's behaviour: the same status codes, `{"error": ...}` bodies, headers and
metrics as the other routes."""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any

from inferforge.serve.datatypes import BINARY_ONLY
from inferforge.serve.engine import InferRequest, ServeError, ShuttingDown
from inferforge.serve.http import errors
from inferforge.serve.http.codec import decode_request, encode_response

log = logging.getLogger(__name__)

_ANON = itertools.count()  # ids for requests that bring none (cheaper than uuid4 on the hot path)
_PREFIX, _SUFFIX = "/v2/models/", "/infer"

Scope = dict[str, Any]


class ClientGone(Exception):
    """The client disconnected before its body arrived: there is no one to answer."""


def infer_target(path: str) -> tuple[str, str | None] | None:
    """(model, version or None) when `path` is `/v2/models/{m}[/versions/{v}]/infer`, else None."""
    if not (path.startswith(_PREFIX) and path.endswith(_SUFFIX)):
        return None
    parts = path[len(_PREFIX) : -len(_SUFFIX)].split("/")
    if len(parts) == 1 and parts[0]:
        return parts[0], None
    if len(parts) == 3 and parts[0] and parts[1] == "versions" and parts[2]:
        return parts[0], parts[2]
    return None


def header_values(scope: Scope, *names: bytes) -> list[str | None]:
    """The named request headers (lower-case names), decoded; None where absent."""
    found: dict[bytes, bytes] = {}
    for key, value in scope["headers"]:
        if key in names:
            found[key] = value
    return [found[n].decode("latin-1") if n in found else None for n in names]


async def read_body(receive: Any, declared: str | None, limit: int) -> bytes:
    """The whole body, refused (413) past `limit` on the declared length or while it streams."""
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise errors.PayloadTooLarge(
            f"request body of {declared} bytes is over the server's limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        if chunk:
            total += len(chunk)
            if total > limit:
                raise errors.PayloadTooLarge(f"request body is over the server's limit of {limit} bytes")
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def send_bytes(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def handle_infer(
    state: Any, scope: Scope, receive: Any, send: Any, name: str, version: str | None
) -> None:
    """Answer one infer request: outputs, or the error in the V2 shape; never raises."""
    start = time.monotonic()
    metrics = state.metrics
    labels = ("_unknown", "")
    inflight = runner = None
    try:
        try:
            if scope["method"] != "POST":
                response = errors.error_response(errors.MethodNotAllowed("infer takes POST"))
                response.headers["Allow"] = "POST"
                await response(scope, receive, send)
                return
            if state.draining:
                raise ShuttingDown(
                    "the server is shutting down and takes no new requests; retry on another replica"
                )
            auth, length, header_len = header_values(
                scope, b"authorization", b"content-length", b"inference-header-content-length"
            )
            state.authorize(auth)
            runner = state.runner_for(name, version)
            labels = (name, runner.version)
            inflight, success, latency = metrics.request_series(*labels)
            inflight.inc()
            body = await read_body(receive, length, state.options.max_body_bytes)
            payload, out_header_len = await _run(state, runner, body, header_len, start)
        except ServeError as exc:
            metrics.requests.labels(*labels, errors.classify(exc)[1]).inc()
            if runner is not None:
                runner.stats.record_request(False, int((time.monotonic() - start) * 1e9))
            await errors.error_response(exc)(scope, receive, send)
            return
        finally:
            if inflight is not None:
                inflight.dec()
        elapsed = time.monotonic() - start
        success.inc()
        latency.observe(elapsed)
        runner.stats.record_request(True, int(elapsed * 1e9))
        if out_header_len is None:
            await send_bytes(send, 200, payload, [(b"content-type", b"application/json")])
        else:
            headers = [
                (b"content-type", b"application/octet-stream"),
                (b"inference-header-content-length", str(out_header_len).encode()),
            ]
            await send_bytes(send, 200, payload, headers)
    except ClientGone:
        return
    except Exception as exc:  # a bug must still answer, in the protocol's shape
        log.exception("infer on %s failed", name)
        await send_bytes(
            send,
            500,
            b'{"error":"internal server error: ' + type(exc).__name__.encode() + b'"}',
            [(b"content-type", b"application/json")],
        )


async def _run(
    state: Any, runner: Any, body: bytes, header_len: str | None, start: float
) -> tuple[bytes, int | None]:
    decoded = decode_request(body, header_len, runner.input_specs, state.shm)
    deadline = start + runner.config.timeout_s
    if decoded.timeout_us is not None:
        deadline = min(deadline, start + decoded.timeout_us / 1e6)
    wanted = None if decoded.outputs is None else tuple(o.name for o in decoded.outputs)
    request = InferRequest(
        id=decoded.id or f"anon-{next(_ANON)}",
        inputs=decoded.inputs,
        outputs=wanted,
        deadline=deadline,
        arrival=start,
    )
    result = await state.engine.infer(runner.name, runner.version, request)
    if decoded.outputs is None:  # BF16 has no JSON form: unnamed BF16 outputs come back binary
        types = runner.output_datatypes
        binary = {n: decoded.binary_default or types.get(n) in BINARY_ONLY for n in result.outputs}
    else:
        binary = {o.name: o.binary for o in decoded.outputs}
    shm_out = {o.name: o.shm for o in decoded.outputs or () if o.shm is not None}
    return encode_response(
        runner.name,
        result.model_version,
        decoded.id,
        result.outputs,
        binary,
        runner.output_datatypes,
        shm_out,
        state.shm,
    )


class V2App:
    """The ASGI app uvicorn runs: infer requests go to `handle_infer`, everything else (and the lifespan) to
    the FastAPI app."""

    def __init__(self, api: Any, state: Any) -> None:
        self.api = api
        self.state = state

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            target = infer_target(scope["path"])
            if target is not None:
                await handle_infer(self.state, scope, receive, send, *target)
                return
        await self.api(scope, receive, send)
