"""The int4 batch-1 GEMV (`llm/gemv_int4.py`) on gemlite's packed bytes, against dequantizing and then
`gemv_reference`.

The weights are quantized by `quant._int4_pack` (the project's int4 recipe) and packed as gemlite's
`GemLiteLinearTriton.pack` packs them (gemlite itself needs a GPU to import, so its CPU packing is copied
here). Runs on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed (CI's CPU
environment has none, so there these tests skip).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tests.llm.conftest import greedy_without_and_with_gemv

from inferforge.llm import decode_gemv, fused, gemv, gemv_check, gemv_int4
from inferforge.llm.quant import INT4_GROUP, _int4_pack

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _pack_weights_over_cols_torch(w_q: torch.Tensor, w_nbits: int, packing_bitwidth: int) -> torch.Tensor:
    """gemlite/bitpack.py `pack_weights_over_cols_torch` (transpose=True), copied: element j of a row goes to
    int32 column j // (32 / nbits) at bit (j % (32 / nbits)) * nbits, then the result is transposed."""
    elements_per_sample = packing_bitwidth // w_nbits
    w_q = w_q.to(torch.int32)
    out = torch.zeros(
        (w_q.shape[0], w_q.shape[1] // elements_per_sample), dtype=torch.int32, device=w_q.device
    )
    for j in range(w_q.shape[1]):
        out[:, j // elements_per_sample] |= w_q[:, j] << ((j % elements_per_sample) * w_nbits)
    return out.t()


class _GemliteInt4(torch.nn.Module):
    """What `helper.A16Wn.from_weights(W_q, scale, zero, W_nbits=4, group_size)` leaves on a CUDA device
    (`GemLiteLinearTriton.pack`, core.py: packed over K and made contiguous; scales and zeros viewed (N, -1),
    transposed and made contiguous; zeros as -zero * scale for an fma (W_group_mode 4), except when the group
    is the whole row (channel-wise: then `A16Wn` sets W_group_mode 3, channel_scale_mode 0)). Its forward is
    the dequantized product, for the model test."""

    def __init__(self, w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                 bias: torch.Tensor | None = None, packing_bitwidth: int = 32,
                 contiguous: bool = True):  # fmt: skip
        super().__init__()
        n, k = w_q.shape
        self.in_features, self.out_features, self.W_nbits, self.group_size = k, n, 4, group
        self.elements_per_sample, self.unpack_mask = packing_bitwidth // 4, 15
        self.scaled_activations, self.channel_scale_mode, self.bias = False, 0, bias
        w = _pack_weights_over_cols_torch(w_q, 4, packing_bitwidth)
        self.W_q = w.contiguous() if contiguous else w
        self.scales = scale.view(n, -1).t().contiguous()
        if group == k:
            self.zeros, self.W_group_mode = zero.view(n, -1).t().contiguous(), 3
        else:
            self.zeros = (-zero.float() * scale.float()).to(zero.dtype).view(n, -1).t().contiguous()
            self.W_group_mode = 4
        self.dequantized = _dequantize(w_q, scale, zero, group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.dequantized.to(x.dtype), self.bias)


def _dequantize(w_q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    """W ~ (W_q - zero) * scale from the unpacked values (as gemlite rounds: -zero * scale to the scales'
    dtype first when that is the fma form)."""
    s, z = scale.float().repeat_interleave(group, 1), zero.float().repeat_interleave(group, 1)
    if group == w_q.shape[1]:
        return (w_q.float() - z) * s
    zs = (-zero.float() * scale.float()).to(zero.dtype).float().repeat_interleave(group, 1)
    return w_q.float() * s + zs


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(DEVICE)


def _layer(n: int, k: int, group: int, seed: int, dtype: torch.dtype = torch.float32, **kw: object) -> tuple:
    g = torch.Generator().manual_seed(seed)
    w = _randn(g, n, k)
    w_q, scale, zero = _int4_pack(w, group)
    layer = _GemliteInt4(w_q, scale.to(dtype), zero.to(dtype), group, **kw)  # type: ignore[arg-type]
    return w, layer


SHAPES = [(48, 128, 64), (38, 192, 64), (20, 256, 32), (24, 64, 64)]  # (N, K, group); group == K: mode 3
TILES = [gemv.TileConfig(8, 32, 1), gemv.TileConfig(4, 128, 2), None]  # a tile inside a group, 2-4 groups


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize(("n", "k", "group"), SHAPES)
def test_each_prologue_and_epilogue_matches_the_reference_in_fp32(
    n: int, k: int, group: int, tiles: gemv.TileConfig | None
) -> None:
    """Through `decode_gemv.linear` on the layer's packed bytes: ragged N, K in several tiles and groups, the
    norm prologue, bias, residual add, SiLU pairs (gate rows then up rows), wider output."""
    g = torch.Generator().manual_seed(n * k + group)
    x, r, nw, b = (_randn(g, *s) for s in ((1, k), (1, n), (k,), (n,)))
    _, layer = _layer(n, k, group, seed=n + k)
    cases: list[dict[str, object]] = [
        {},
        {"norm_weight": nw, "eps": 0.5},  # eps as large as the mean square, so using it shows
        {"residual": r},
        {"norm_weight": nw, "eps": 1e-5, "silu_pair": True},
        {"out_dtype": torch.float64},
    ]
    for kw in cases:
        got = decode_gemv.linear(x, layer, tiles=tiles, **kw)
        want = gemv_check.gemv_reference(x, layer.dequantized, **kw)  # type: ignore[arg-type]
        assert got.shape == want.shape and got.dtype == want.dtype, kw
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    layer.bias = b
    want = gemv_check.gemv_reference(x, layer.dequantized, bias=b, residual=r)
    torch.testing.assert_close(
        decode_gemv.linear(x, layer, tiles=tiles, residual=r), want, rtol=1e-4, atol=1e-4
    )


def test_the_product_is_the_float_layer_up_to_int4_rounding() -> None:
    """The packed path approximates the unquantized weight (a check on the reference's own dequantization):
    min-max int4 over groups of 64 Gaussian weights leaves ~9% relative error; a misread nibble order or
    group, ~120%."""
    w, layer = _layer(64, 512, 64, seed=1)
    x = _randn(torch.Generator().manual_seed(2), 1, 512)
    got, exact = decode_gemv.linear(x, layer), x @ w.T
    assert (got - exact).norm() < 0.15 * exact.norm()


def _rope_case(group: int) -> tuple:
    g = torch.Generator().manual_seed(3)
    heads, kv_heads, d, k = 4, 2, 16, 128
    x, nw, cos, sin = _randn(g, 1, k), _randn(g, k), _randn(g, 50, d), _randn(g, 50, d)
    caches = [_randn(g, 3, 16, kv_heads, d) for _ in range(2)]
    _, layer = _layer((heads + 2 * kv_heads) * d, k, group, seed=4)
    return heads, kv_heads, layer, x, nw, cos, sin, caches


@pytest.mark.parametrize(("block_n", "group"), [(2, 32), (8, 128), (16, 64)])
def test_rope_cache_epilogue_equals_the_reference_then_the_rope_kernel(block_n: int, group: int) -> None:
    """q rotated, k rotated into its slot, v copied into its slot, for every way a head's rows split over
    programs: as the dequantized product followed by `fused.rope_write_cache`."""
    heads, kv_heads, layer, x, nw, cos, sin, (kc, vc) = _rope_case(group)
    pos, slot = torch.tensor([37], device=DEVICE), torch.tensor([21], device=DEVICE)
    kc2, vc2, kc0 = kc.clone(), vc.clone(), kc.clone()
    rc = gemv.RopeCache(cos, sin, pos, slot, kc, vc, heads, kv_heads)
    tiles = gemv.TileConfig(block_n, 64, 1)
    q = decode_gemv.linear(x, layer, norm_weight=nw, eps=1e-5, rope_cache=rc, tiles=tiles)
    qkv = gemv_check.gemv_reference(x, layer.dequantized, norm_weight=nw, eps=1e-5)
    q2, _, _ = fused.rope_write_cache(qkv, cos, sin, pos, slot, kc2, vc2, heads, kv_heads, True, False)
    torch.testing.assert_close(q, q2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(kc, kc2, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(vc, vc2, rtol=1e-4, atol=1e-4)
    assert not torch.equal(kc.view(-1, kv_heads, 16)[21], kc0.view(-1, kv_heads, 16)[21])


def test_errors_are_gemv_s() -> None:
    heads, kv_heads, layer, x, _, cos, sin, (kc, vc) = _rope_case(64)
    one = torch.tensor([1], device=DEVICE)
    rc = gemv.RopeCache(cos, sin, one, one, kc, vc, heads + 1, kv_heads)
    with pytest.raises(ValueError, match="rope_cache needs N"):
        decode_gemv.linear(x, layer, rope_cache=rc)
    with pytest.raises(ValueError, match="one row"):
        decode_gemv.linear(torch.randn(2, 128, device=DEVICE), layer)
    with pytest.raises(ValueError, match="silu_pair"):
        decode_gemv.linear(torch.randn(1, 64, device=DEVICE), _layer(7, 64, 64, seed=0)[1], silu_pair=True)


def _spoiled(change: str) -> torch.nn.Module:
    w, layer = _layer(16, 192, 64, seed=5)
    if change == "post-scale":  # `A16Wn(post_scale=True)` (gemlite's default on AMD) with group == K
        layer.W_group_mode, layer.channel_scale_mode = 1, 1
    elif change == "scaled activations":
        layer.scaled_activations = True
    elif change == "16-bit words":
        layer.elements_per_sample = 4
    elif change == "not contiguous":  # `pack(contiguous=False)`: W_q stays the [K/8, N] transposed view
        layer = _GemliteInt4(*_int4_pack(w, 64), 64, contiguous=False)
    elif change == "integer zero":  # symmetric with shift: zeros a 0-d int32 tensor, W_group_mode 3
        layer.zeros, layer.W_group_mode = torch.tensor(8, dtype=torch.int32), 3
    elif change == "mx":  # MXFP4: W_group_mode 2, no zeros
        layer.zeros, layer.W_group_mode = torch.tensor([[]], dtype=torch.int32), 2
    elif change == "group of 96":
        layer = _layer(16, 192, 96, seed=5)[1]
    return layer


SPOILS = [
    "post-scale",
    "scaled activations",
    "16-bit words",
    "not contiguous",
    "integer zero",
    "mx",
    "group of 96",
]


@pytest.mark.parametrize("change", SPOILS)
def test_layouts_it_does_not_read_are_refused(change: str) -> None:
    assert decode_gemv.can_run(_layer(16, 192, 64, seed=5)[1])
    assert not decode_gemv.can_run(_spoiled(change))


def test_int4_is_not_offered_as_unquantized() -> None:
    assert not decode_gemv.can_run(_layer(16, 192, 64, seed=5)[1], quantized=False)


def test_bf16_matches_the_reference_to_bf16_rounding() -> None:
    """The model's dtype: bf16 activations, scales and zeros (the fma zeros rounded to bf16 as gemlite does);
    the reference multiplies bf16-rounded weights, the kernel fp32 ones (measured: 1-3 bf16 steps apart)."""
    g = torch.Generator().manual_seed(6)
    x, r, nw = (_randn(g, *s).to(torch.bfloat16) for s in ((1, 256), (1, 96), (256,)))
    _, layer = _layer(96, 256, 64, seed=7, dtype=torch.bfloat16)
    for kw in ({}, {"residual": r}, {"norm_weight": nw, "eps": 1e-5, "silu_pair": True}):
        got = decode_gemv.linear(x, layer, **kw)
        want = gemv_check.gemv_reference(x, layer.dequantized, **kw)  # type: ignore[arg-type]
        assert got.dtype == want.dtype == torch.bfloat16, kw
        # one bf16 step is 0.4-0.8% of a value; the weights' rounding and the SiLU product compound a few
        assert (got.float() - want.float()).abs().max() <= 3e-2 * want.float().abs().max(), kw


def _int4(linear: torch.nn.Module) -> _GemliteInt4:
    assert isinstance(linear, torch.nn.Linear)
    return _GemliteInt4(*_int4_pack(linear.weight.data, INT4_GROUP), INT4_GROUP, bias=linear.bias)


def test_model_decodes_the_same_tokens_through_gemv_int4(
    qwen2_fp32_eager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32, every product int4 (`quant.quantize_model`'s layers; hidden 64 makes q/k/v, o, gate/up and the
    LM head channel-wise (W_group_mode 3), down grouped (4)): batch-1 decode through `gemv` generates exactly
    the tokens of the eager model running the same dequantized weights."""
    eng = qwen2_fp32_eager
    if not torch.cuda.is_available():  # 8 times fewer programs: the interpreter runs them one by one
        monkeypatch.setattr(gemv_int4, "default_tiles", lambda n, k: gemv.TileConfig(64, 2048, 4))
    for layer in eng.model.blocks():
        layer.attn.qkv, layer.attn.o = _int4(layer.attn.qkv), _int4(layer.attn.o)
        layer.mlp.up, layer.mlp.down = _int4(layer.mlp.up), _int4(layer.mlp.down)
    eng.model.lm_head = _int4(eng.model.lm_head)
    want, got = greedy_without_and_with_gemv(eng)
    assert got == want
