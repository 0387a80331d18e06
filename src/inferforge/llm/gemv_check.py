"""`gemv`'s reference and the checks that gate it: eager torch with the unfused model's rounding, the kernel
against it on 1.2B-like shapes, and against each decode layer's own forward on the model's real weights. The
engine switches a model to `gemv` only when both pass on the live device (`llm/kernels.py`)."""

from __future__ import annotations

import torch

from inferforge.llm import fused
from inferforge.llm.decode_gemv import linear, operands
from inferforge.llm.gemv import RopeCache, gemv


def gemv_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`gemv` in eager torch, with the unfused model's rounding (norm, product, sum and activation each
    rounded to the activation dtype). RoPE and the cache writes are `fused.rope_write_cache`'s."""
    import torch.nn.functional as F

    if norm_weight is not None:
        x = fused.add_rmsnorm_reference(x, None, norm_weight, eps)[0]
    if weight.dtype == torch.uint8:
        weight = (weight.to(torch.int16) - 128).to(torch.int8)
    y = F.linear(x, weight.to(x.dtype)).float() if scale is None else (x.float() @ weight.float().T) * scale
    if bias is not None:
        y = y + bias.float()
    if residual is not None:
        return y.to(x.dtype) + residual
    if silu_pair:
        gate, up = y.to(x.dtype).chunk(2, dim=-1)
        return F.silu(gate) * up
    return y.to(out_dtype or x.dtype)


def matches_layers(
    layers: list[torch.nn.Module], dtype: torch.dtype, tolerance: float = 2e-2, int4_tolerance: float = 6e-2
) -> dict[str, float]:
    """`linear` against each layer's own forward (cuBLAS, or gemlite's kernels for quantized layers) on a
    random row, relative to the largest output: the check that the bytes are read as the layer means them
    (packing, scales, zeros), on the model's real weights; a misread layout is off by O(1). Raises if one is
    off by more than `tolerance` (`int4_tolerance` for gemlite's int4 layers: its batch-1 kernel sums in
    the activation dtype and differed by 2.9% from this one, which sums in fp32, on the H100, run E10)."""
    errors: dict[str, float] = {}
    gen = torch.Generator(device="cpu").manual_seed(1)
    for i, layer in enumerate(layers):
        ref_w = operands(layer)
        assert ref_w is not None, f"gemv cannot run {type(layer).__name__}"
        weight = ref_w[0]
        k = weight.shape[1]  # type: ignore[attr-defined]  # a tensor or an `Int4Weight`, both [N, K] shaped
        dev = weight.device if isinstance(weight, torch.Tensor) else weight.packed.device  # type: ignore[attr-defined]
        x = torch.randn(1, k, generator=gen).to(dev, dtype)
        want = layer(x).float()
        got = linear(x, layer).float()
        errors[f"{i}:{type(layer).__name__}"] = err = ((got - want).abs().max() / want.abs().max()).item()
        if not err <= (int4_tolerance if getattr(layer, "W_nbits", None) == 4 else tolerance):
            raise RuntimeError(f"gemv disagrees with {type(layer).__name__} {tuple(want.shape)}: {err:.3g}")
    return errors


def check_against_reference(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Largest difference to `gemv_reference` (and, for RoPE, to `fused.rope_write_cache`) relative to the
    reference's largest magnitude, on 1.2B-like shapes (one bf16 rounding step is about 4e-3)."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()

    err: dict[str, float] = {}
    x, r, g = rand(1, 2048), rand(1, 2048), rand(2048)
    w, w13, w2 = rand(2048, 2048) * 0.02, rand(2 * 3000, 2048) * 0.02, rand(5000, 8192) * 0.02
    err["norm_residual"] = rel(gemv(x, w, residual=r), gemv_reference(x, w, residual=r))
    kw: dict = {"norm_weight": g, "eps": 1e-5}
    err["norm_silu_pair"] = rel(
        gemv(x, w13, silu_pair=True, **kw), gemv_reference(x, w13, silu_pair=True, **kw)
    )
    x3, b = rand(1, 8192), rand(5000)
    err["plain_bias_fp32_out"] = rel(
        gemv(x3, w2, bias=b, out_dtype=torch.float32), gemv_reference(x3, w2, bias=b, out_dtype=torch.float32)
    )
    heads, kv_heads, d = 32, 8, 64
    wq = rand((heads + 2 * kv_heads) * d, 2048) * 0.02
    cos, sin = rand(100, d), rand(100, d)
    pos, slot = torch.tensor([57], device=device), torch.tensor([9], device=device)
    kc, vc = rand(2, 16, kv_heads, d), rand(2, 16, kv_heads, d)
    kc2, vc2 = kc.clone(), vc.clone()
    q = gemv(x, wq, rope_cache=RopeCache(cos, sin, pos, slot, kc, vc, heads, kv_heads), **kw)
    q2, _, _ = fused.rope_write_cache(
        gemv(x, wq, **kw), cos, sin, pos, slot, kc2, vc2, heads, kv_heads, True, False
    )
    err["norm_rope_cache"] = max(rel(q, q2), rel(kc, kc2), rel(vc, vc2))
    return err


def verified(device: torch.device, dtype: torch.dtype, tolerance: float = 2e-2) -> bool:
    return all(e <= tolerance for e in check_against_reference(device, dtype).values())
