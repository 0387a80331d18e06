"""The engine process's opt-in profile (`INFERFORGE_ENGINE_PROFILE`): written when the engine shuts down,
with the child's loop in it, so a slow server can be diagnosed where its one core goes."""

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
