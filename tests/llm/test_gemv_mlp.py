"""The batch-1 MLP in one launch (`llm/gemv_mlp.py`) against the two `gemv` calls it replaces.

Runs on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed (CI's CPU
environment has none, so there these tests skip). The interpreter runs programs one after another in index
order, the order the kernel's waits assume.
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

from inferforge.llm import decode_gemv, gemv, gemv_mlp
from inferforge.llm.engine import EngineConfig, LLMEngine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _weights(hidden: int, inter: int, dtype: torch.dtype, int8: bool, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, hidden, generator=g)
    w_gu = torch.randn(2 * inter, hidden, generator=g) * 0.1
    w_down = torch.randn(hidden, inter, generator=g) * 0.05
    out = {"x": x.to(DEVICE, dtype), "norm_weight": torch.randn(hidden, generator=g).to(DEVICE, dtype)}
    if not int8:
        return out | {"w_gu": w_gu.to(DEVICE, dtype), "w_down": w_down.to(DEVICE, dtype)}
    for name, w in (("gu", w_gu), ("down", w_down)):
        scale = w.abs().amax(1) / 127
        out[f"w_{name}"] = (w / scale[:, None]).round().to(torch.int8).to(DEVICE)
        out[f"s_{name}"] = scale.to(DEVICE, dtype)
    return out


def _chain(c: dict) -> torch.Tensor:
    norm = {"norm_weight": c["norm_weight"], "eps": 1e-5}
    h = gemv.gemv(c["x"], c["w_gu"], scale=c.get("s_gu"), silu_pair=True, **norm)
    return gemv.gemv(h, c["w_down"], scale=c.get("s_down"), residual=c["x"])


def _fused(c: dict) -> torch.Tensor:
    return gemv_mlp.mlp(c["x"], c["w_gu"], c["w_down"], norm_weight=c["norm_weight"], eps=1e-5,
                        scale_gu=c.get("s_gu"), scale_down=c.get("s_down"))  # fmt: skip


@pytest.mark.parametrize("layout", ["split", "rows"])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize(("hidden", "inter"), [(64, 4096), (128, 256)])
def test_one_launch_gives_the_two_calls_bits_and_leaves_its_counters_at_zero(
    hidden: int, inter: int, int8: bool, layout: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Down in two K chunks (4,096) and in one (256), both layouts; float and int8 weights with their
    scales. The sums are the chain's, in the same order: equal bits. A second launch reuses the counters."""
    monkeypatch.setitem(gemv_mlp.DOWN_LAYOUT, "layout", layout)
    dtype = torch.float32 if DEVICE == "cpu" else torch.bfloat16
    c = _weights(hidden, inter, dtype, int8)
    want = _chain(c)
    for _ in range(2):
        assert torch.equal(_fused(c), want)
        rows = gemv_mlp.tiles(c["w_gu"], c["w_down"])[1].block_n
        scratch = gemv_mlp._SCRATCH[(c["x"].device, dtype, hidden, inter, rows)]
        assert not scratch[2].any() and not scratch[3].any()  # row-block and chunk counts back at zero


def test_refuses_what_it_cannot_run() -> None:
    c = _weights(64, 256, torch.float32, int8=False)
    x3, w3, d3 = (torch.randn(*s, device=DEVICE) for s in ((1, 48), (512, 48), (48, 256)))
    assert not gemv_mlp.supported(x3, w3, d3)  # hidden 48 is not a power of two
    with pytest.raises(ValueError, match="cannot run"):
        gemv_mlp.mlp(x3, w3, d3, norm_weight=torch.ones(48, device=DEVICE), eps=1e-5)
    with pytest.raises(ValueError, match="scales"):
        gemv_mlp.mlp(c["x"], c["w_gu"], c["w_down"], norm_weight=c["norm_weight"], eps=1e-5,
                     scale_gu=torch.ones(512, device=DEVICE))  # fmt: skip


def test_model_decodes_the_same_tokens_with_the_fused_mlp(tiny_dirs: dict[str, Path], monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """fp32 tiny Llama: greedy tokens through `decode_gemv` with each layer's MLP in one launch equal the
    eager model's; the model's check accepts the fused MLP on its own layers, and refuses it when off."""
    monkeypatch.setitem(gemv_mlp.FUSED_MLP, "bf16", True)
    eng = LLMEngine(tiny_dirs["llama"], EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=1024,
                                                     cuda_graphs=False))  # fmt: skip
    layer = eng.model.blocks()[0]
    args = (layer.mlp.up, layer.mlp.down, layer.norm2.weight, eng.model.cfg.norm_eps, torch.float32)
    assert decode_gemv.fused_mlp_checked(*args)
    calls: list[int] = []
    monkeypatch.setattr(gemv_mlp, "mlp", _counting(gemv_mlp.mlp, calls))
    eng.model.fused_mlp = True
    want, got = greedy_without_and_with_gemv(eng)
    assert got == want and calls, "the fused MLP did not run"
    monkeypatch.setitem(gemv_mlp.FUSED_MLP, "bf16", False)
    assert not decode_gemv.fused_mlp_checked(*args)


def _counting(fn, calls: list[int]):  # type: ignore[no-untyped-def]
    def counted(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return fn(*a, **kw)

    return counted


@pytest.mark.skipif(DEVICE != "cuda", reason="the 1.2B shape: too slow for the interpreter")
@pytest.mark.parametrize("layout", ["split", "rows"])
@pytest.mark.parametrize("int8", [False, True])
def test_the_1b_shape_on_the_device_equals_the_chain_also_replayed_from_a_graph(
    int8: bool, layout: str, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    """Hidden 2,048, intermediate 8,192 (four K chunks, 2,560 or 3,072 programs, many waves of them), bf16:
    the chain's bits, also from a CUDA graph with programmatic dependent launch on, replayed three times."""
    from inferforge.llm import fused

    monkeypatch.setitem(gemv_mlp.DOWN_LAYOUT, "layout", layout)
    c = _weights(2048, 8192, torch.bfloat16, int8, seed=1)
    want = _chain(c)
    assert torch.equal(_fused(c), want)
    pdl = fused._LAUNCH["pdl"]
    fused.enable_pdl(torch.cuda.get_device_capability() >= (9, 0))
    try:
        _fused(c)  # compiled outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = _fused(c)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, want)
    finally:
        fused.enable_pdl(pdl)
