"""The batch-1 decode GEMV (`llm/gemv.py`) against its torch reference and inside the model.

Runs on a CUDA device (every tensor on `DEVICE`), or on the CPU through Triton's interpreter where Triton is
installed (CI's CPU environment has none, so there these tests skip).
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

from inferforge.llm import decode_gemv, fused, gemv, gemv_check
from inferforge.llm.engine import EngineConfig, LLMEngine

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("tiles", [gemv.TileConfig(8, 32, 1), gemv.TileConfig(4, 128, 2), None])
@pytest.mark.parametrize(("n", "k"), [(48, 64), (38, 96), (20, 300)])
def test_each_prologue_and_epilogue_matches_the_reference_in_fp32(
    n: int, k: int, tiles: gemv.TileConfig | None
) -> None:
    """Ragged N and K (masks), K in several tiles, the norm prologue, bias, residual add, SiLU pairs (gate
    rows then up rows), fp32 logits out."""
    g = torch.Generator().manual_seed(n * k)
    x, r, nw, w, b = (torch.randn(*s, generator=g).to(DEVICE) for s in ((1, k), (1, n), (k,), (n, k), (n,)))
    cases = [
        {},
        {"norm_weight": nw, "eps": 1e-5},
        {"bias": b, "residual": r},
        {"norm_weight": nw, "eps": 1e-5, "silu_pair": True},
        {"out_dtype": torch.float64},
    ]
    for kw in cases:
        got = gemv.gemv(x, w, tiles=tiles, **kw)  # type: ignore[arg-type]
        want = gemv_check.gemv_reference(x, w, **kw)  # type: ignore[arg-type]
        assert got.shape == want.shape and got.dtype == want.dtype, kw
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_silu_pair_refuses_an_odd_width() -> None:
    with pytest.raises(ValueError, match="silu_pair"):
        gemv.gemv(torch.randn(1, 16, device=DEVICE), torch.randn(7, 16, device=DEVICE), silu_pair=True)


def test_int8_weights_with_a_scale() -> None:
    w = torch.randn(33, 128, device=DEVICE)
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().to(torch.int8)
    x = torch.randn(1, 128, device=DEVICE)
    got = gemv.gemv(x, q, scale=scale, tiles=gemv.TileConfig(8, 64, 1))
    torch.testing.assert_close(got, gemv_check.gemv_reference(x, q, scale=scale), rtol=1e-4, atol=1e-4)
    assert (got - x @ w.T).abs().max() < 0.03 * (x @ w.T).abs().max()  # int8 rounding only


def test_one_row_only() -> None:
    with pytest.raises(ValueError, match="one row"):
        gemv.gemv(torch.randn(2, 16, device=DEVICE), torch.randn(8, 16, device=DEVICE))


def test_model_decodes_the_same_tokens_through_gemv(tiny_dirs: dict[str, Path], qwen2_fp32_eager) -> None:
    """fp32: batch-1 decode through gemv (norms, SiLU and the final norm fused) generates exactly the eager
    model's greedy tokens; `gemv_ready` refuses GPT-2 (LayerNorm, GELU)."""
    want, got = greedy_without_and_with_gemv(qwen2_fp32_eager)
    assert got == want
    gpt2 = LLMEngine(tiny_dirs["gpt2"], EngineConfig(device=DEVICE, kv_cache_tokens=1024, cuda_graphs=False))
    assert not gpt2.model.gemv_ready()


def _rope_case(t_dtype: torch.dtype = torch.float32) -> tuple:
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, k = 4, 2, 16, 64
    n = (heads + 2 * kv_heads) * d
    w, x, r, nw = (torch.randn(*s, generator=g).to(DEVICE, t_dtype) for s in ((n, k), (1, k), (1, k), (k,)))
    cos, sin = (torch.randn(50, d, generator=g).to(DEVICE, t_dtype) for _ in range(2))
    caches = [torch.randn(3, 16, kv_heads, d, generator=g).to(DEVICE, t_dtype) for _ in range(2)]
    return heads, kv_heads, w, x, r, nw, cos, sin, caches


@pytest.mark.parametrize("block_n", [2, 8, 16, 64])
def test_rope_cache_epilogue_equals_gemv_then_the_rope_kernel(block_n: int) -> None:
    """q rotated, k rotated into its slot, v copied into its slot: the same as the separate q/k/v product
    followed by `fused.rope_write_cache`, for every way the rows of a head split over programs."""
    heads, kv_heads, w, x, _, nw, cos, sin, (kc, vc) = _rope_case()
    pos, slot = torch.tensor([37], device=DEVICE), torch.tensor([21], device=DEVICE)
    kc2, vc2 = kc.clone(), vc.clone()
    rc = gemv.RopeCache(cos, sin, pos, slot, kc, vc, heads, kv_heads)
    kw = {"norm_weight": nw, "eps": 1e-5}
    q = gemv.gemv(x, w, rope_cache=rc, tiles=gemv.TileConfig(block_n, 64, 1), **kw)  # type: ignore[arg-type]
    qkv = gemv.gemv(x, w, **kw)  # type: ignore[arg-type]
    q2, _, _ = fused.rope_write_cache(qkv, cos, sin, pos, slot, kc2, vc2, heads, kv_heads, True, False)
    torch.testing.assert_close(q, q2)
    torch.testing.assert_close(kc, kc2)
    torch.testing.assert_close(vc, vc2)
    assert not torch.equal(kc.view(-1, kv_heads, 16)[21], _rope_case()[8][0].view(-1, kv_heads, 16)[21])


def test_rope_cache_refuses_a_layout_that_is_not_q_k_v_heads() -> None:
    heads, kv_heads, w, x, _, _, cos, sin, (kc, vc) = _rope_case()
    one = torch.tensor([1], device=DEVICE)
    rc = gemv.RopeCache(cos, sin, one, one, kc, vc, heads + 1, kv_heads)
    with pytest.raises(ValueError, match="rope_cache needs N"):
        gemv.gemv(x, w, rope_cache=rc)


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("mode", [0, 2, 3, 5, 6])
def test_int8_conversions_agree(mode: int, pre: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """int8 by conversion (direct or through fp16), by bits (3, 5, 6: the PTX one on a GPU, 5 in the
    interpreter) and uint8 holding q + 128 (rebuilt by bits) give the same product, every int8 value
    included; also with the first tile rebuilt as fp16 before the wait (`PRE_CONVERT`, the two-tile K here
    runs both the pre-converted first tile and a converted second one)."""
    monkeypatch.setitem(gemv.INT8_MODE, "mode", mode)
    monkeypatch.setitem(gemv.PRE_CONVERT, "int8", pre)
    g = torch.Generator().manual_seed(5)
    q = torch.randint(-128, 128, (24, 256), generator=g, dtype=torch.int16).to(DEVICE, torch.int8)
    scale, x = torch.rand(24, generator=g).to(DEVICE) / 100, torch.randn(1, 256, generator=g).to(DEVICE)
    want = (x @ q.float().T) * scale
    biased = (q.to(torch.int16) + 128).to(torch.uint8)
    for w in (q, biased):
        got = gemv.gemv(x, w, scale=scale, tiles=gemv.TileConfig(8, 128, 1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE == "cpu", reason="fp8 weights in a Triton kernel need a GPU")
@pytest.mark.parametrize("pre", [False, True])
def test_fp8_weights_rebuilt_before_or_after_the_wait_agree(pre: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(gemv.PRE_CONVERT, "fp8", pre)
    g = torch.Generator().manual_seed(6)
    w = (torch.randn(40, 512, generator=g) * 8).to(DEVICE, torch.float8_e4m3fn)
    scale, x = torch.rand(40, generator=g).to(DEVICE) / 100, torch.randn(1, 512, generator=g).to(DEVICE)
    want = (x @ w.float().T) * scale
    for tiles in (gemv.TileConfig(8, 128, 1), None):  # a 4-tile K and the default one-tile K
        got = gemv.gemv(x, w, scale=scale, tiles=tiles)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


class _Gemlite8Bit(torch.nn.Module):
    """The attributes gemlite's 8-bit channel-wise layers carry (`GemLiteLinearTriton.pack`: `W_q` is the
    transposed [N, K] weight, `scales` [1, N], no zeros); gemlite itself needs a GPU."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, per_sample: int = 1):
        super().__init__()
        self.W_nbits, self.elements_per_sample = 8, per_sample
        self.W_q, self.scales, self.bias = q.t(), scale.view(-1, 1).t(), bias
        self.zeros = torch.tensor([[]], dtype=torch.int32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ (self.W_q.float() * self.scales)
        return y if self.bias is None else y + self.bias


def test_gemlite_8bit_layers_run_on_their_own_bytes() -> None:
    g = torch.Generator().manual_seed(9)
    w, b, x = (torch.randn(*s, generator=g).to(DEVICE) for s in ((40, 96), (40,), (1, 96)))
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().to(torch.int8)
    layer = _Gemlite8Bit(q, scale, b)
    assert decode_gemv.can_run(layer)
    got = decode_gemv.linear(x, layer)
    torch.testing.assert_close(got, x @ (q.float() * scale[:, None]).T + b, rtol=1e-4, atol=1e-4)
    assert not decode_gemv.can_run(_Gemlite8Bit(q, scale, b, per_sample=4))  # packed (int4): not this kernel
    assert decode_gemv.can_run(torch.nn.Linear(4, 4))


def test_layers_are_checked_against_their_own_forward() -> None:
    """The engine's check on the model's real layers: a layer read as it means itself passes; one whose
    bytes mean something else (here its own forward scales differently) is refused with the reason."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g).to(DEVICE)
    scale = w.abs().amax(1) / 127
    q = (w / scale[:, None]).round().to(torch.int8)
    good, plain = _Gemlite8Bit(q, scale, None), torch.nn.Linear(64, 24).to(DEVICE)
    errors = gemv_check.matches_layers([good, plain], torch.float32)
    assert max(errors.values()) < 1e-4
    bad = _Gemlite8Bit(q, scale, None)
    bad.forward = lambda x: x @ (bad.W_q.float() * bad.scales * 1.1)  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="gemv disagrees with _Gemlite8Bit"):
        gemv_check.matches_layers([bad], torch.float32)


def test_the_engines_gate_turns_gemv_on_for_a_model_it_can_run(tiny_dirs: dict[str, Path]) -> None:
    """`kernels._enable_gemv`, the engine's path on CUDA, run here on the CPU: the reference check and the
    real-layer check pass, and the model decodes through gemv."""
    from inferforge.llm import kernels

    config = EngineConfig(device=DEVICE, dtype="float32", kv_cache_tokens=1024, cuda_graphs=False,
                          fused_kernels=False)  # fmt: skip
    eng = LLMEngine(tiny_dirs["llama"], config)
    assert eng.model.gemv_ops is None
    assert kernels._enable_gemv(eng.model, config, torch.device(DEVICE)) is None
    assert eng.model.gemv_ops is decode_gemv


@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("k", [256, 250])
def test_split_k_gives_the_whole_row_product(split: int, int8: bool, k: int, monkeypatch: pytest.MonkeyPatch):
    """Several programs per row block (`gemv.SPLIT_K`), whose last sums the partials: the result of one
    program walking every tile, plain and with the residual (ragged N and K), called twice (the counts are
    back at zero after each call); products with a norm prologue stay whole."""
    g = torch.Generator().manual_seed(split * k)
    n, tiles = 40, gemv.TileConfig(8, 64, 1)  # 5 row blocks of 4 K tiles
    x, r, w = (torch.randn(*s, generator=g).to(DEVICE) for s in ((1, k), (1, n), (n, k)))
    scale = None
    if int8:
        scale = w.abs().amax(1) / 127
        w = (w / scale[:, None]).round().to(torch.int8)
    for kw in ({}, {"residual": r}):
        monkeypatch.setitem(gemv.SPLIT_K, "int8" if int8 else "bf16", 1)
        whole = gemv.gemv(x, w, scale=scale, tiles=tiles, **kw)  # type: ignore[arg-type]
        monkeypatch.setitem(gemv.SPLIT_K, "int8" if int8 else "bf16", split)
        assert gemv._split_k(w, tiles, k, plain=True) == split
        for _ in range(2):
            got = gemv.gemv(x, w, scale=scale, tiles=tiles, **kw)  # type: ignore[arg-type]
            torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
            _, counts = gemv._SPLIT_SCRATCH[(x.device, n, split, 5)]  # cuda:0, not "cuda"
            assert counts.tolist() == [0] * 5
    want = gemv_check.gemv_reference(x, w, scale=scale, residual=r)  # type: ignore[arg-type]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert gemv._split_k(w, tiles, k, plain=False) == 1  # a norm prologue or RoPE / SiLU epilogue
    assert gemv._split_k(w, gemv.TileConfig(8, 64, 1), 3 * 64, plain=True) == 1  # 3 tiles do not split


def test_split_k_products_of_one_width_and_other_row_blocks_keep_their_own_counts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two products of the same N split alike but with different row blocks (o in 16-row tiles, down in 8)
    each get counts for all their row blocks, whichever runs first."""
    g = torch.Generator().manual_seed(7)
    n = 64
    x, r = torch.randn(1, 256, generator=g).to(DEVICE), torch.randn(1, n, generator=g).to(DEVICE)
    w = torch.randn(n, 256, generator=g).to(DEVICE)
    monkeypatch.setitem(gemv.SPLIT_K, "bf16", 2)
    for tiles in (gemv.TileConfig(16, 64, 1), gemv.TileConfig(8, 64, 1)):  # 4 row blocks, then 8
        got = gemv.gemv(x, w, residual=r, tiles=tiles)
        torch.testing.assert_close(got, gemv_check.gemv_reference(x, w, residual=r), rtol=1e-4, atol=1e-4)
    counts = [c for (_, width, split, *_), (_, c) in gemv._SPLIT_SCRATCH.items() if width == n and split == 2]
    assert sorted(c.numel() for c in counts) == [4, 8] and all(int(c.abs().sum()) == 0 for c in counts)


def test_l2_prefetch_leaves_the_product_unchanged() -> None:
    """Ranges fetched into L2 before the wait (another weight's two halves, as gate/up's) change nothing in
    the result, twice; unaligned or more than two ranges are refused by name."""
    g = torch.Generator().manual_seed(7)
    x, r, w = (torch.randn(*s, generator=g).to(DEVICE) for s in ((1, 256), (1, 40), (40, 256)))
    other = torch.randn(64, 1000, generator=g).to(DEVICE)
    plain = gemv.gemv(x, w, residual=r, tiles=gemv.TileConfig(8, 64, 4))
    half = other.numel() * 2
    ranges = ((other.data_ptr(), half), (other.data_ptr() + half, half - 16))
    for _ in range(2):
        got = gemv.gemv(x, w, residual=r, tiles=gemv.TileConfig(8, 64, 4), prefetch=ranges)
        torch.testing.assert_close(got, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match="16-byte aligned"):
        gemv.gemv(x, w, prefetch=((other.data_ptr() + 4, 64),))
    with pytest.raises(ValueError, match="up to two"):
        gemv.gemv(x, w, prefetch=ranges + ranges[:1])


def test_prefetch_plan_gives_each_product_its_targets_ranges(monkeypatch: pytest.MonkeyPatch) -> None:
    """`decode_gemv.L2_PREFETCH` as byte ranges: gate/up by halves (its programs read row j and j + N/2),
    others from the start, fractions of the bytes rounded down to 16, at most two ranges a product."""
    up, down, o = (torch.nn.Linear(k, n, bias=False) for n, k in ((64, 32), (32, 32), (32, 32)))
    policy = {"qkv": (("gate_up", 0.5),), "o": (("down", 1.0),), "gate_up": (), "down": ()}
    monkeypatch.setattr(decode_gemv, "L2_PREFETCH", policy)
    plan = decode_gemv.prefetch_plan({"o": o, "gate_up": up, "down": down, "next_qkv": o})
    start, total = up.weight.data_ptr(), up.weight.numel() * 4
    assert plan["qkv"] == ((start, total // 4), (start + total // 2, total // 4))
    assert plan["o"] == ((down.weight.data_ptr(), down.weight.numel() * 4),)
    assert plan["gate_up"] == () and plan["down"] == ()
