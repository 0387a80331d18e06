"""Tiny model folders built once per test session (a second each, offline)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

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


@pytest.fixture
def qwen2_fp32_eager(tiny_dirs: dict[str, Path]):
    """The tiny Qwen2 (q/k/v bias) in fp32 with eager kernels, fresh for each test (tests swap its layers)."""
    from inferforge.llm.engine import EngineConfig, LLMEngine

    config = EngineConfig(dtype="float32", kv_cache_tokens=2048, cuda_graphs=False, fused_kernels=False,
                          device="cuda" if torch.cuda.is_available() else "cpu")  # fmt: skip
    return LLMEngine(tiny_dirs["qwen2"], config)


def greedy_without_and_with_gemv(eng) -> tuple[list[int], list[int]]:
    """10 greedy tokens of one prompt through the model's own decode, then through `decode_gemv` (which the
    model must accept)."""
    from inferforge.llm import decode_gemv
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def run() -> list[int]:
        res = eng.generate([EngineRequest("a", tuple(range(5, 25)), params)])
        return [t for o in res["a"][0] for t in o.new_token_ids]

    want = run()
    eng.model.gemv_ops = decode_gemv
    assert eng.model.gemv_ready()
    return want, run()


def record_graph_steps(graphs: Any) -> list[bool]:
    """Wrap a `PrefillGraphs`' `run`: the list gets, per prompt step, whether it took the graphs' layout (a
    replay on the GPU) or fell back to the eager path."""
    took: list[bool] = []
    run = graphs.run

    def recorded(*args: Any, **kwargs: Any) -> Any:
        hidden = run(*args, **kwargs)
        took.append(hidden is not None)
        return hidden

    graphs.run = recorded
    return took
