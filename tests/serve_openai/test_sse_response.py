"""`SSEResponse` and `until_disconnect` against the ASGI calls uvicorn makes.

A stream ends and closes its body (the body's cleanup is what aborts the engine request) when the client
leaves; a stream that runs to its end leaves its task uncancelled."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from inferforge.serve.openai.app import ClientGone, SSEResponse, until_disconnect


def _client(leave_after: int | None) -> tuple[list[dict], Any, Any]:
    """ASGI receive/send of a client that disconnects once `leave_after` messages were sent (None: never)."""
    sent: list[dict] = []
    gone = asyncio.Event()

    async def receive() -> dict:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)
        if leave_after is not None and len(sent) >= leave_after:
            gone.set()

    return sent, receive, send


def test_stream_ends_and_closes_its_body_when_the_client_leaves() -> None:
    async def main() -> tuple[list[dict], bool, int]:
        closed = asyncio.Event()

        async def body() -> Any:
            try:
                yield b"data: 1\n\n"
                await asyncio.sleep(30)  # the engine has nothing yet
                yield b"data: 2\n\n"
            finally:
                closed.set()

        sent, receive, send = _client(leave_after=2)

        async def respond() -> int:  # the task the watcher cancels goes on without a stray cancellation
            await SSEResponse(body(), {"x-test": "1"})({"type": "http"}, receive, send)
            await asyncio.sleep(0.01)
            return asyncio.current_task().cancelling()

        cancelling = await asyncio.wait_for(respond(), 5)
        return sent, closed.is_set(), cancelling

    sent, closed, cancelling = asyncio.run(main())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    headers = dict(sent[0]["headers"])
    assert headers[b"content-type"].startswith(b"text/event-stream") and b"content-length" not in headers
    assert [m["body"] for m in sent[1:]] == [b"data: 1\n\n"]
    assert closed and cancelling == 0


def test_stream_that_ends_sends_everything_and_leaves_no_cancellation() -> None:
    async def main() -> tuple[list[dict], int]:
        async def body() -> Any:
            for k in range(3):
                await asyncio.sleep(0)
                yield f"data: {k}\n\n".encode()

        sent, receive, send = _client(leave_after=None)
        await SSEResponse(body(), {})({"type": "http"}, receive, send)
        await asyncio.sleep(0.01)  # a watcher still alive would act now
        return sent, asyncio.current_task().cancelling()

    sent, cancelling = asyncio.run(main())
    assert [m.get("body") for m in sent[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n", b""]
    assert sent[-1]["more_body"] is False and cancelling == 0


class _Request:
    def __init__(self, receive: Any) -> None:
        self.receive = receive


def test_until_disconnect_raises_client_gone_and_cancels_the_work() -> None:
    async def main() -> tuple[bool, int]:
        cancelled = asyncio.Event()

        async def work() -> int:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return 1

        _, receive, send = _client(leave_after=1)
        loop = asyncio.get_running_loop()
        loop.call_later(0.05, lambda: asyncio.ensure_future(send({"type": "ping"})))

        async def call() -> int:  # the task the watcher cancels goes on without a stray cancellation
            with pytest.raises(ClientGone):
                await until_disconnect(_Request(receive), work())  # type: ignore[arg-type]
            await asyncio.sleep(0.01)
            return asyncio.current_task().cancelling()

        cancelling = await asyncio.wait_for(call(), 5)
        return cancelled.is_set(), cancelling

    cancelled, cancelling = asyncio.run(main())
    assert cancelled and cancelling == 0


def test_until_disconnect_returns_the_result_while_the_client_stays() -> None:
    async def main() -> int:
        async def work() -> int:
            await asyncio.sleep(0.01)
            return 7

        _, receive, _ = _client(leave_after=None)
        return await until_disconnect(_Request(receive), work())  # type: ignore[arg-type]

    assert asyncio.run(main()) == 7
