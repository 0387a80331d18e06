"""uvicorn's httptools protocol, waking the app once per request body instead of once per socket read.

uvicorn hands a body to the app in pieces: every read from the socket (up to 256 KiB with uvloop) sets the
request's event, wakes the app's task and, past 64 KiB buffered, pauses reading until the app has taken the
piece. A 602 KB tensor thus costs four task wake-ups, four `receive` calls, pauses and resumes, and two
copies of the whole body (into uvicorn's bytearray, then out of it). Here the body
collects in the protocol until the request is complete or `BODY_CHUNK` bytes have gathered, whichever is
first, so the app normally wakes once. Memory per connection stays bounded by `BODY_CHUNK` plus one read,
and the app still refuses a declared length over `--max-body-mib` before reading anything. The pieces are
joined once, which also saves one of uvicorn's two copies of the body.

Where httptools is missing, uvicorn's pure-Python h11 protocol is used unchanged (`protocol_spec`)."""

from __future__ import annotations

import asyncio

BODY_CHUNK = 4 * 1024 * 1024
"""Bytes collected before the app is woken even though the body goes on."""


PROTOCOL = "inferforge.serve.http.protocol:WholeBodyProtocol"


def protocol_spec() -> str:
    """What to give `uvicorn.Config(http=...)`: ours where httptools is installed, else uvicorn's choice. An
    import string, so that `--http-workers` processes resolve it themselves."""
    return PROTOCOL if HttpToolsProtocol is not None else "auto"


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # no httptools: uvicorn falls back to h11
    HttpToolsProtocol = None  # type: ignore[misc, assignment]

if HttpToolsProtocol is not None:

    class WholeBodyProtocol(HttpToolsProtocol):  # type: ignore[misc, valid-type]
        """Body pieces wait in a list and are joined once, into `bytes` (which uvicorn's `receive` then
        hands on without the copy it makes of its own bytearray)."""

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            self._parts: list[bytes] = []
            self._held = 0
            super().connection_made(transport)

        def on_body(self, body: bytes) -> None:
            if (self.parser.should_upgrade() and self._should_upgrade()) or self.cycle.response_complete:
                return
            self._parts.append(body)
            self._held += len(body)
            if self._held >= BODY_CHUNK:
                self._flush()
                self.flow.pause_reading()
                self.cycle.message_event.set()

        def on_message_complete(self) -> None:
            self._flush()
            super().on_message_complete()

        def _flush(self) -> None:
            parts, self._parts, self._held = self._parts, [], 0
            if not parts:
                return
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            cycle = self.cycle
            # bytes where uvicorn keeps a bytearray: its `receive` passes bytes on as they are
            cycle.body = bytes(cycle.body) + joined if cycle.body else joined  # type: ignore[assignment]
