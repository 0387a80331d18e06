"""The engine process (`ProcessEngine`): its opt-in profile (`INFERFORGE_ENGINE_PROFILE`, written when the
engine shuts down, with the child's loop in it) and engine options that must reach the child."""

from __future__ import annotations

import asyncio
import pstats
from pathlib import Path

import pytest

from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.serve.openai.engine_process import ProcessEngine


def test_profile_written_at_shutdown(
    tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "engine.prof"
    monkeypatch.setenv("INFERFORGE_ENGINE_PROFILE", str(path))
    eng = ProcessEngine(tiny_llama, device="cpu")

    async def run() -> list[int]:
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        request = EngineRequest("p", (5, 6, 7), params)
        ids = [t async for out in eng.generate(request) for t in out.new_token_ids]
        await eng.shutdown(10.0)
        return ids

    assert len(asyncio.run(run())) == 4
    names = {fn for _, _, fn in pstats.Stats(str(path)).stats}  # type: ignore[attr-defined]
    assert {"_serve", "step"} <= names


def test_process_engine_reuses_a_cached_prefix(tiny_llama: Path) -> None:
    """`enable_prefix_caching` reaches the engine in the child process; its stats come back to the parent."""
    eng = ProcessEngine(tiny_llama, device="cpu", enable_prefix_caching=True)
    prefix = tuple(range(40, 80))
    params = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def run() -> int:
        for i, tail in enumerate(((1,), (2,))):
            async for _ in eng.generate(EngineRequest(f"p{i}", prefix + tail, params)):
                pass
        cached = eng.stats().prefix_cached_tokens_total
        await eng.shutdown(10.0)
        return cached

    assert asyncio.run(run()) == 32
