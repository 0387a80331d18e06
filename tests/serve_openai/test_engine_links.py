"""One engine process, several links (`--api-server-count`): each link gets its own requests' outputs; a
link's goodbye or loss stops only its requests; a wrong key gets nothing; the primary's stop ends the rest."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from inferforge.llm.protocol import EngineOutput, EngineRequest, SamplingParams
from inferforge.serve.openai.engine_link import EngineClosedError, EngineLink
from inferforge.serve.openai.engine_process import ProcessEngine, connect_engine


@pytest.fixture
def hub(long_llama: Path) -> Iterator[tuple[ProcessEngine, str, bytes]]:
    folder = tempfile.mkdtemp()
    address, key = os.path.join(folder, "engine.sock"), secrets.token_bytes(32)
    eng = ProcessEngine(long_llama, device="cpu", listen=(address, key))
    yield eng, address, key
    asyncio.run(eng.shutdown(0.0))


def link(long_llama: Path, address: str, key: bytes) -> EngineLink:
    return connect_engine(address, key, long_llama)


async def collect(lnk: EngineLink, rid: str, prompt: tuple[int, ...], max_tokens: int) -> list[EngineOutput]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [out async for out in lnk.generate(EngineRequest(rid, prompt, params))]


async def until(check, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached")


def test_each_link_gets_its_own_outputs(hub, long_llama: Path) -> None:
    eng, address, key = hub
    a, b = link(long_llama, address, key), link(long_llama, address, key)

    async def run() -> tuple[list[EngineOutput], ...]:
        return await asyncio.gather(
            collect(a, "a1", (5, 6, 7), 9), collect(b, "b1", (8, 9), 7), collect(eng, "p1", (11,), 5)
        )

    outs_a, outs_b, outs_p = asyncio.run(run())
    for outs, rid, n in ((outs_a, "a1", 9), (outs_b, "b1", 7), (outs_p, "p1", 5)):
        assert {o.request_id for o in outs} == {rid}
        assert outs[-1].finished and outs[-1].completion_tokens == n
        assert sum(len(o.new_token_ids) for o in outs) == n


def test_a_goodbye_or_a_lost_link_stops_only_its_requests(hub, long_llama: Path) -> None:
    eng, address, key = hub
    a, b, c = (link(long_llama, address, key) for _ in range(3))

    async def run() -> list[EngineOutput]:
        b_task = asyncio.create_task(collect(b, "b-long", (7,), 300))
        a_task = asyncio.create_task(collect(a, "a-long", (8,), 2000))
        c_task = asyncio.create_task(collect(c, "c-long", (9,), 2000))
        await until(lambda: _running(eng, 3))
        await a.shutdown(0.0)  # goodbye: the engine aborts a's request and answers "bye"
        outs_a = await a_task
        assert outs_a[-1].finish_reason == "abort"
        vanish(c)
        await until(lambda: _running(eng, 1))
        c_task.cancel()
        outs_b = await b_task
        assert outs_b[-1].finish_reason == "length" and outs_b[-1].completion_tokens == 300
        await until(lambda: _running(eng, 0))
        return outs_b

    asyncio.run(run())
    assert eng.stats().kv_blocks_used == 0


def vanish(lnk: EngineLink) -> None:
    """A worker that died: its end of the connection shuts, and the engine reads EOF."""
    socket.socket(fileno=os.dup(lnk._conn.fileno())).shutdown(socket.SHUT_RDWR)


async def _running(eng: ProcessEngine, n: int) -> bool:
    return (await eng.refresh_stats()).running == n


def test_a_wrong_key_is_refused_and_the_engine_goes_on(hub, long_llama: Path) -> None:
    from multiprocessing import AuthenticationError

    eng, address, _ = hub
    with pytest.raises((AuthenticationError, EOFError, ConnectionError)):
        connect_engine(address, secrets.token_bytes(32), long_llama)
    assert asyncio.run(collect(eng, "after", (5,), 3))[-1].completion_tokens == 3


def test_the_primary_stop_fails_linked_requests(long_llama: Path) -> None:
    folder = tempfile.mkdtemp()
    address, key = os.path.join(folder, "engine.sock"), secrets.token_bytes(32)
    eng = ProcessEngine(long_llama, device="cpu", listen=(address, key))
    b = link(long_llama, address, key)

    async def run() -> None:
        task = asyncio.create_task(collect(b, "b-long", (7,), 2000))
        await until(lambda: _running(eng, 1))
        await eng.shutdown(0.0)
        outs = await task  # ended cleanly, as at the end of a drain
        assert outs[-1].finish_reason == "abort"

        async def b_gone() -> bool:  # the engine's last word ("fail") reaches b's reader just after
            return not b.is_alive()

        await until(b_gone)
        with pytest.raises(EngineClosedError, match="gone"):  # the server answers 503
            await collect(b, "b-late", (7,), 3)

    asyncio.run(run())
    assert not b.is_alive() and not eng.is_alive()


def test_a_worker_that_cannot_link_exits_with_the_startup_failure_code(
    long_llama: Path, tmp_path: Path
) -> None:
    """The supervisor stops the server on this code instead of replacing the worker again and again."""
    import multiprocessing as mp

    from inferforge.serve.openai.limits import ServerLimits
    from inferforge.serve.openai.workers import STARTUP_FAILED, WorkerSpec, _worker_main, bind

    spec = WorkerSpec(str(long_llama), None, ServerLimits(), None, 1.0, "warning", 5.0,
                      str(tmp_path / "no-engine.sock"), b"k" * 32, str(tmp_path))  # fmt: skip
    sock = bind("127.0.0.1", 0)
    proc = mp.get_context("spawn").Process(target=_worker_main, args=(sock, spec))
    proc.start()
    proc.join(60)
    sock.close()
    assert proc.exitcode == STARTUP_FAILED == 3
