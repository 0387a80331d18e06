"""The fused Triton kernels (norm + residual, RoPE + cache write, SiLU x up) against the eager model.

They run on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed; CI's CPU
environment has no Triton, so there these tests skip.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import fused
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_kernels_match_their_eager_formulas() -> None:
    exact = fused.check_against_reference(torch.device(DEVICE), torch.float32)
    assert max(exact.values()) < 1e-5, exact
    rounded = fused.check_against_reference(torch.device(DEVICE), torch.bfloat16)
    assert max(rounded.values()) < 3e-2, rounded


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_fused_model_generates_the_same_tokens(tiny_dirs: dict[str, Path], family: str) -> None:
    """fp32, so the kernels are exact: greedy tokens equal the eager model's, through prefill chunks of 7
    tokens (the cache is read back) and batched decode."""
    config = EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=2048, max_num_batched_tokens=16,
                          cuda_graphs=False, fused_kernels=False)  # fmt: skip
    eager = LLMEngine(tiny_dirs[family], config)
    assert eager.model.can_fuse() and eager.model.fused_ops is None
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [tuple(range(5, 25)), (7, 8, 9), tuple(range(40, 52))]

    def run(engine: LLMEngine) -> list[list[int]]:
        res = engine.generate([EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
        return [[t for o in res[str(i)][0] for t in o.new_token_ids] for i in range(len(prompts))]

    want = run(eager)
    eager.model.fused_ops = fused
    assert run(eager) == want


def test_prefill_mlp_in_token_chunks_equals_one_pass(
    tiny_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`MLP_CHUNK`: a 16-token prefill step's MLP in chunks of 5 (a ragged last chunk) writes the same rows
    as one pass (fp32, exact), so greedy tokens are unchanged."""
    from inferforge.llm import model

    config = EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=2048, max_num_batched_tokens=16,
                          cuda_graphs=False, fused_kernels=False)  # fmt: skip
    eng = LLMEngine(tiny_dirs["llama"], config)
    eng.model.fused_ops = fused
    mlp = eng.model.blocks()[0].mlp
    assert type(mlp.down) is torch.nn.Linear and mlp.down.bias is None  # the chunked path applies
    x = torch.randn(16, mlp.up.in_features, device=DEVICE)
    whole = mlp.forward_fused(x, fused)
    monkeypatch.setitem(model.MLP_CHUNK, "tokens", 5)
    assert (mlp.forward_fused(x, fused) - whole).abs().max().item() < 1e-5
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    chunked = eng.generate([EngineRequest("a", tuple(range(5, 25)), params)])["a"][0]
    monkeypatch.setitem(model.MLP_CHUNK, "tokens", 0)
    one_pass = eng.generate([EngineRequest("a", tuple(range(5, 25)), params)])["a"][0]
    assert [o.new_token_ids for o in chunked] == [o.new_token_ids for o in one_pass]


def test_gpt2_is_not_fused(tiny_dirs: dict[str, Path]) -> None:
    eng = LLMEngine(tiny_dirs["gpt2"], EngineConfig(device=DEVICE, kv_cache_tokens=1024, cuda_graphs=False))
    assert not eng.model.can_fuse() and eng.model.fused_ops is None


def test_rope_write_cache_in_token_blocks_for_prompts() -> None:
    """More than 64 tokens run in blocks of 32 per program (a ragged last block): q and k rotated as
    transformers does, k and v written at their slots."""
    heads, kv, d, t = 4, 2, 16, 100
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(t, (heads + 2 * kv) * d, generator=g)
    cos, sin = torch.randn(200, d, generator=g), torch.randn(200, d, generator=g)
    pos, slots = torch.randperm(200, generator=g)[:t], torch.randperm(160, generator=g)[:t]
    dev = torch.device(DEVICE)
    qkv, cos, sin, pos, slots = (x.to(dev) for x in (qkv, cos, sin, pos, slots))
    kc, vc = torch.zeros(10, 16, kv, d, device=dev), torch.zeros(10, 16, kv, d, device=dev)
    q, k, _ = fused.rope_write_cache(qkv, cos, sin, pos, slots, kc, vc, heads, kv, True, True)
    qk = qkv[:, : (heads + kv) * d].view(t, heads + kv, d)
    ref = qk * cos[pos].unsqueeze(1) + qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2) * sin[
        pos
    ].unsqueeze(1)
    assert k is not None
    torch.testing.assert_close(q, ref[:, :heads])
    torch.testing.assert_close(k, ref[:, heads:])
    torch.testing.assert_close(kc.view(-1, kv, d)[slots], ref[:, heads:])
    torch.testing.assert_close(vc.view(-1, kv, d)[slots], qkv[:, (heads + kv) * d :].view(t, kv, d))
