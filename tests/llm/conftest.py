"""Tiny model folders built once per test session (a second each, offline)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferforge.llm.tiny import make_tiny_llama


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_models")
    return {family: make_tiny_llama(root / family, family=family) for family in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs: dict[str, Path]) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture(scope="module")
def engine(tiny_llama: Path):
    from inferforge.llm.engine import EngineConfig, LLMEngine

    return LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, max_waiting=8))
