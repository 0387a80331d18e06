"""The batch-1 decode GEMV (`llm/gemv.py`) against its torch reference and inside the model.

Runs on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed (CI's CPU
environment has none, so there these tests skip).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import fused, gemv
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tiles", [gemv.TileConfig(8, 32, 1), gemv.TileConfig(4, 128, 2), None])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (37, 96), (20, 300)])
def test_each_prologue_matches_the_reference_in_fp32(n: int, k: int, tiles: gemv.TileConfig | None) -> None:
    """Ragged N and K (masks), K in several tiles, every prologue, bias, a scale, fp32 logits out."""
    g = torch.Generator().manual_seed(n * k)
    x, r, nw, w, b = (torch.randn(*s, generator=g) for s in ((1, k), (1, k), (k,), (n, k), (n,)))
    cases = [
        {},
        {"prologue": gemv.NORM, "residual": r, "norm_weight": nw, "eps": 1e-5},
        {"prologue": gemv.NORM, "norm_weight": nw, "eps": 1e-5},
        {"bias": b},
    ]
    for kw in cases:
        got, res = gemv.gemv(x, w, tiles=tiles, **kw)  # type: ignore[arg-type]
        want, res_want = gemv.gemv_reference(x, w, **kw)  # type: ignore[arg-type]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(res, res_want)
    h = torch.randn(1, 2 * k, generator=g)
    torch.testing.assert_close(
        gemv.gemv(h, w, prologue=gemv.SILU, tiles=tiles)[0], gemv.gemv_reference(h, w, prologue=gemv.SILU)[0],
        rtol=1e-4, atol=1e-4,
    )  # fmt: skip


def test_residual_is_a_new_tensor_and_the_old_one_is_untouched() -> None:
    """Every program reads the old residual, so the kernel must not write it in place."""
    x, r, nw, w = torch.randn(1, 64), torch.randn(1, 64), torch.randn(64), torch.randn(40, 64)
    before = r.clone()
    _, res = gemv.gemv(x, w, prologue=gemv.NORM, residual=r, norm_weight=nw, tiles=gemv.TileConfig(8, 64, 1))
    assert res.data_ptr() != r.data_ptr()
    assert torch.equal(r, before)
    torch.testing.assert_close(res, x + r)


def test_int8_weights_with_a_scale() -> None:
    w = torch.randn(33, 128)
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().to(torch.int8)
    x = torch.randn(1, 128)
    got, _ = gemv.gemv(x, q, scale=scale, tiles=gemv.TileConfig(8, 64, 1))
    torch.testing.assert_close(got, gemv.gemv_reference(x, q, scale=scale)[0], rtol=1e-4, atol=1e-4)
    assert (got - x @ w.T).abs().max() < 0.03 * (x @ w.T).abs().max()  # int8 rounding only


def test_one_row_only() -> None:
    with pytest.raises(ValueError, match="one row"):
        gemv.gemv(torch.randn(2, 16), torch.randn(8, 16))


def test_model_decodes_the_same_tokens_through_gemv(tiny_dirs: dict[str, Path]) -> None:
    """fp32: batch-1 decode through gemv (norms, SiLU and the final norm fused) generates exactly the eager
    model's greedy tokens; `gemv_ready` refuses GPT-2 (LayerNorm, GELU)."""
    config = EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=2048, cuda_graphs=False,
                          fused_kernels=False)  # fmt: skip
    eng = LLMEngine(tiny_dirs["qwen2"], config)  # q/k/v bias
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)

    def run() -> list[int]:
        res = eng.generate([EngineRequest("a", tuple(range(5, 25)), params)])
        return [t for o in res["a"][0] for t in o.new_token_ids]

    want = run()
    eng.model.fused_ops, eng.model.gemv_ops = fused, gemv
    assert eng.model.gemv_ready()
    assert run() == want
    gpt2 = LLMEngine(tiny_dirs["gpt2"], EngineConfig(device=DEVICE, kv_cache_tokens=1024, cuda_graphs=False))
    assert not gpt2.model.gemv_ready()
