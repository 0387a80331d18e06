"""Down's output left as partial sums for the next product's prologue (`gemv.gemv_partials`,
`gemv(deferred=...)`) against the residual product it replaces.

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

from tests.llm.conftest import greedy_without_and_with_gemv

from inferforge.llm import decode_gemv, gemv
from inferforge.llm.engine import EngineConfig, LLMEngine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(hidden: int, inter: int, dtype: torch.dtype, int8: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    shapes = {"h": (1, inter), "x": (1, hidden), "nw": (hidden,), "wd": (hidden, inter), "wr": (96, hidden)}
    c = {name: torch.randn(*shape, generator=g) for name, shape in shapes.items()}
    c["wd"], c["wr"], c["sd"] = c["wd"] * 0.05, c["wr"] * 0.1, None
    if int8:
        c["sd"] = c["wd"].abs().amax(1) / 127
        c["wd"] = (c["wd"] / c["sd"][:, None]).round().to(torch.int8)
    return {
        k: None if v is None else v.to(DEVICE, v.dtype if v.dtype == torch.int8 else dtype)
        for k, v in c.items()
    }


def _residual_then_reader(c: dict) -> tuple[torch.Tensor, torch.Tensor]:
    y = gemv.gemv(c["h"], c["wd"], scale=c["sd"], residual=c["x"])
    return y, gemv.gemv(y, c["wr"], norm_weight=c["nw"], eps=1e-5)


def _deferred(c: dict, splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    d = gemv.gemv_partials(c["h"], c["wd"], residual=c["x"], splits=splits, scale=c["sd"])
    return d.out, gemv.gemv(d.out, c["wr"], norm_weight=c["nw"], eps=1e-5, deferred=d)


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize(("inter", "splits"), [(4096, 2), (4096, 1), (256, 1)])
def test_partials_summed_by_the_reader_give_the_residual_product_s_bits(
    inter: int, splits: int, int8: bool
) -> None:
    """K in two tiles (4,096) shared by 2 programs or walked by 1, and in one tile; float and int8 with its
    scale: the reader's output and the residual stream it writes equal the two products' bits (the sums run
    in the same order)."""
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    c = _case(64, inter, dtype, int8)
    want_x, want = _residual_then_reader(c)
    got_x, got = _deferred(c, splits)
    assert torch.equal(got, want) and torch.equal(got_x, want_x)


def test_bad_splits_and_a_deferred_sum_without_a_norm_are_refused() -> None:
    c = _case(64, 4096, torch.float32, int8=False)
    with pytest.raises(ValueError, match="splits"):
        gemv.gemv_partials(c["h"], c["wd"], residual=c["x"], splits=3)
    d = gemv.gemv_partials(c["h"], c["wd"], residual=c["x"], splits=1)
    with pytest.raises(ValueError, match="norm prologue"):
        gemv.gemv(d.out, c["wr"], deferred=d)
    with pytest.raises(ValueError, match="norm prologue"):
        gemv.gemv(c["x"], c["wr"], norm_weight=c["nw"], deferred=d)


def test_model_decodes_the_same_tokens_with_down_s_sum_deferred(
    tiny_dirs: dict[str, Path], monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """fp32 tiny Llama: the engine's check takes the deferred sum on its own layers where it is on (and not
    where it is off), and greedy tokens through `decode_gemv` with it equal the eager model's."""
    eng = LLMEngine(tiny_dirs["llama"], EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=1024,
                                                     cuda_graphs=False))  # fmt: skip
    m = eng.model
    blocks = m.blocks()
    args = ([b.mlp.down for b in blocks], [b.attn.qkv for b in blocks] + [m.lm_head],
            (blocks[0].mlp.up, blocks[0].norm2.weight, m.cfg.norm_eps))  # fmt: skip
    assert decode_gemv.deferred_down_splits(*args) == 0  # off by default
    monkeypatch.setitem(gemv.DEFER_DOWN_SUM, "bf16", 1)
    m.down_splits = decode_gemv.deferred_down_splits(*args)
    assert m.down_splits == 1
    calls: list[int] = []
    real = gemv.gemv_partials
    monkeypatch.setattr(decode_gemv, "gemv_partials", lambda *a, **k: calls.append(1) or real(*a, **k))
    want, got = greedy_without_and_with_gemv(eng)
    assert got == want and calls, "the deferred sum did not run"


@pytest.mark.skipif(DEVICE != "cuda", reason="the 1.2B shape: too slow for the interpreter")
@pytest.mark.parametrize("int8", [False, True])
def test_the_1b_shape_on_the_device_also_from_a_graph(int8: bool) -> None:
    """Down's K = 8,192 in 4 tiles: 4 splits give the residual product's bits, also from a CUDA graph with
    programmatic dependent launch, replayed three times; 2 splits sum in another order, within 1e-2."""
    from inferforge.llm import fused

    c = _case(2048, 8192, torch.bfloat16, int8, seed=1)
    c["wr"] = torch.randn(3072, 2048, device=DEVICE, dtype=torch.bfloat16) * 0.02
    want_x, want = _residual_then_reader(c)
    _, got = _deferred(c, 2)
    assert ((got.float() - want.float()).abs().max() / want.float().abs().max()).item() < 1e-2
    pdl = fused._LAUNCH["pdl"]
    fused.enable_pdl(torch.cuda.get_device_capability() >= (9, 0))
    try:
        _deferred(c, 4)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out_x, out = _deferred(c, 4)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want) and torch.equal(out_x, want_x)
    finally:
        fused.enable_pdl(pdl)
