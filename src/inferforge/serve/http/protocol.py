"""uvicorn's httptools protocol, waking the app once per request body instead of once per socket read.

uvicorn hands a body to the app in pieces: every read from the socket (up to 256 KiB with uvloop) sets the
request's event, wakes the app's task and, past 64 KiB buffered, pauses reading until the app has taken the
piece. A 602 KB tensor thus costs four task wake-ups, four `receive` calls and their copies; at low load
that is a tenth of the server's time per request (`benchmarks/serve/overhead_cpu.py`). Here the body
collects in the protocol until the request is complete or `BODY_CHUNK` bytes have gathered, whichever is
first, so the app normally wakes once. Memory per connection stays bounded by `BODY_CHUNK` plus one read,
and the app still refuses a declared length over `--max-body-mib` before reading anything.

Where httptools is missing, uvicorn's pure-Python h11 protocol is used unchanged (`protocol_spec`)."""

from __future__ import annotations

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
        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            if (self.parser.should_upgrade() and self._should_upgrade()) or cycle.response_complete:
                return
            cycle.body += body
            if len(cycle.body) >= BODY_CHUNK:
                self.flow.pause_reading()
                cycle.message_event.set()
