"""AsyncLLMEngine: streaming, disconnects that free their slot (running or queued), shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from inferforge.llm.async_engine import AsyncLLMEngine, EngineClosedError
from inferforge.llm.protocol import EngineRequest, SamplingParams

LONG = SamplingParams(max_tokens=200, ignore_eos=True)


@pytest.fixture(scope="module")
def aengine(tiny_llama: Path):
    eng = AsyncLLMEngine.from_pretrained(
        tiny_llama, kv_cache_tokens=2048, max_num_seqs=1, max_num_batched_tokens=16
    )
    yield eng
    asyncio.run(eng.shutdown(0.0))


async def _wait_idle(eng: AsyncLLMEngine) -> None:
    for _ in range(200):
        s = eng.stats()
        if s.running == 0 and s.waiting == 0:
            return
        await asyncio.sleep(0.01)


def test_stream_reassembles_to_the_whole_text(aengine: AsyncLLMEngine) -> None:
    async def main() -> tuple[str, list[int]]:
        prompt = tuple(aengine.apply_chat_template([{"role": "user", "content": "hello"}]))
        text, ids = "", []
        req = EngineRequest("s", prompt, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
        async for out in aengine.generate(req):
            text += out.new_text
            ids.extend(out.new_token_ids)
        assert out.finished and out.finish_reason == "length" and out.completion_tokens == 12
        return text, ids

    text, ids = asyncio.run(main())
    assert len(ids) == 12 and text == aengine.decode(ids)


def test_disconnect_frees_the_slot_while_running_and_while_queued(aengine: AsyncLLMEngine) -> None:
    async def consume(rid: str, seen: list[int]) -> None:
        async for out in aengine.generate(EngineRequest(rid, (5, 6, 7), LONG)):
            seen.append(len(out.new_token_ids))
            await asyncio.sleep(0)

    async def main() -> None:
        seen_a: list[int] = []
        running = asyncio.create_task(consume("a", seen_a))
        while not seen_a:
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(consume("b", []))  # max_num_seqs=1: waits behind "a"
        await asyncio.sleep(0.05)
        assert aengine.stats().waiting == 1 and aengine.stats().kv_blocks_used > 0
        queued.cancel()
        await asyncio.gather(queued, return_exceptions=True)
        assert aengine.stats().waiting == 0
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await _wait_idle(aengine)
        assert aengine.stats().running == 0 and aengine.stats().kv_blocks_used == 0

    asyncio.run(main())


def test_shutdown_aborts_after_grace_and_refuses_new_work(tiny_llama: Path) -> None:
    eng = AsyncLLMEngine.from_pretrained(tiny_llama, kv_cache_tokens=2048)

    async def main() -> None:
        reasons: list[str | None] = []

        async def consume() -> None:
            async for out in eng.generate(
                EngineRequest("x", (5, 6), SamplingParams(max_tokens=250, ignore_eos=True))
            ):
                if out.finished:
                    reasons.append(out.finish_reason)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        await eng.shutdown(grace_s=0.0)
        await asyncio.wait_for(task, 5)
        assert reasons == ["abort"]
        with pytest.raises(EngineClosedError):
            async for _ in eng.generate(EngineRequest("y", (5,), SamplingParams())):
                pass

    asyncio.run(main())
