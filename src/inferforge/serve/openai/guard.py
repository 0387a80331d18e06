"""ASGI middleware in front of every route: API keys, body size, and refusing new work while draining.

Pure ASGI (not a FastAPI dependency) so that a rejected request costs no JSON parsing and a too-large body is
never read past the cap.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

from inferforge.serve.openai.errors import error_body

OPEN_PATHS = frozenset({"/health"})
KEY_STATE = "api_key_digest"  # request.state field: which key the request came with, as a digest

Scope = dict[str, Any]


class Guard:
    def __init__(
        self, app: Any, *, api_keys: set[str] | None, max_body_bytes: int, is_draining: Callable[[], bool]
    ) -> None:
        self.app = app
        self.keys = [k.encode() for k in api_keys] if api_keys else None
        self.max_body = max_body_bytes
        self.is_draining = is_draining

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if self.keys is not None and not self._authorize(scope):
            await _reply(
                send,
                401,
                "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                code="invalid_api_key",
                extra=[(b"www-authenticate", b"Bearer")],
            )
            return
        if self.is_draining():
            await _reply(
                send,
                503,
                "The server is shutting down and takes no new requests; retry elsewhere.",
                code="draining",
            )
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await _reply(
                send,
                413,
                f"The request body has {int(length)} bytes; this server accepts at most {self.max_body}.",
                code="body_too_large",
            )
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        body, more, total = [], True, 0
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            total += len(chunk)
            if total > self.max_body:
                await _reply(
                    send, 413, f"The request body exceeds {self.max_body} bytes.", code="body_too_large"
                )
                return
            body.append(chunk)
            more = msg.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _authorize(self, scope: Scope) -> bool:
        """Check the bearer key; a good one leaves a digest of itself in the request's state (`KEY_STATE`),
        which scopes the prefix cache per key, never the key itself."""
        auth = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = auth.partition(b" ")
        if scheme.lower() != b"bearer" or not token:
            return False
        token = token.strip()
        if not any(hmac.compare_digest(token, k) for k in self.keys or []):
            return False
        scope.setdefault("state", {})[KEY_STATE] = hashlib.blake2b(token, digest_size=12).hexdigest()
        return True


async def _reply(
    send: Any, status: int, message: str, *, code: str, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    payload = json.dumps(error_body(status, message, code=code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": payload})
