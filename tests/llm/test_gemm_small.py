"""The decode-batch GEMM (`llm/gemm_small.py`) against eager torch written from the unfused model's formulas.

Runs on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed (CI's CPU
environment has none, so there these tests skip). In the interpreter `tl.dot` runs on fp32-widened tiles
(`gemm_small._mma`), so the bf16 cases check masks, the K loop, the prologue and the epilogues' rounding,
not the tensor-core instruction.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.errors import InferforgeError
from inferforge.llm import fused, gemm_small, gemv

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_STEP = 2.0**-7  # one bf16 rounding step is at most this fraction of the value rounded


def reference(
    x: torch.Tensor,
    w: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused layer in eager torch (LlamaRMSNorm, nn.Linear, residual add, SiLU x up, each rounded to
    the model dtype) and, per element, the summed magnitude of the rounded values the output depends on:
    a kernel that sums K in another order may land one rounding step of each away."""
    if norm_weight is not None:
        x = fused.add_rmsnorm_reference(x, None, norm_weight, eps)[0]
    if out_dtype is not None:
        y = x.float() @ w.to(x.dtype).float().T
        return y.to(out_dtype), y.abs()
    y = F.linear(x, w.to(x.dtype))
    if residual is not None:
        out = y + residual
        return out, y.abs().float() + out.abs().float()
    if silu_pair:
        gate, up = y.chunk(2, dim=-1)
        out = F.silu(gate) * up
        return out, (1.1 * gate.abs().float() + 3.0) * up.abs().float() + out.abs().float()
    return y, y.abs().float()


def _check(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item(), msg=what)
        return
    diff = (got.float() - want.float()).abs()
    worst = (diff - BF16_STEP * bound).max().item()
    assert worst <= 1e-6, f"{what}: off by more than one rounding step ({worst})"
    assert (diff == 0).float().mean() > 0.9, f"{what}: most elements should round the same"


CASES = [
    {},
    {"norm_weight": True},
    {"residual": True},
    {"norm_weight": True, "residual": True},
    {"silu_pair": True},
    {"norm_weight": True, "silu_pair": True},
    {"out_dtype": torch.float32},
]
VARIANTS = {
    "prefetch": gemm_small.GemmTiles(block_n=32, block_k=32),
    "pipelined": gemm_small.GemmTiles(block_n=16, block_k=64, prefetch=False, num_stages=2),
    "swap_ab": gemm_small.GemmTiles(block_n=32, block_k=16, swap_ab=True),
    "split_k": gemm_small.GemmTiles(block_n=16, block_k=32, split_k=4),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_prologue_and_epilogue_matches_the_unfused_layer(variant: str, dtype: torch.dtype) -> None:
    """M 2, 5, 16, 64 (odd and full BLOCK_M), N 72 (N/2 = 36 for SiLU pairs: ragged N tiles), K 164
    (ragged last K tile; split-K's splits of unequal length): every prologue / epilogue combination."""
    n, k = 72, 164
    for m in (2, 5, 16, 64):
        g = torch.Generator().manual_seed(m)
        x, w, r = (torch.randn(*s, generator=g).to(DEVICE, dtype) for s in ((m, k), (n, k), (m, n)))
        nw = (1 + torch.randn(k, generator=g) / 4).to(DEVICE, dtype)
        for case in CASES:
            kw = {**case, "norm_weight": nw if "norm_weight" in case else None, "eps": 1e-5}
            kw["residual"] = r if "residual" in case else None
            got = gemm_small.gemm_small(x, w, tiles=VARIANTS[variant], **kw)  # type: ignore[arg-type]
            _check(got, *reference(x, w, **kw), f"M={m} {sorted(case)}")  # type: ignore[arg-type]


def test_default_tiles_and_gemv_tile_configs() -> None:
    """The default table (one K tile of 128 here) and a gemv `TileConfig` (raised to tl.dot's 16)."""
    g = torch.Generator().manual_seed(7)
    x, w, r = (torch.randn(*s, generator=g).to(DEVICE) for s in ((3, 96), (40, 96), (3, 40)))
    for tiles in (None, gemv.TileConfig(8, 32, 1)):
        _check(gemm_small.gemm_small(x, w, residual=r, tiles=tiles), *reference(x, w, residual=r), str(tiles))
    assert gemm_small.default_tiles(16384, 2048, 2).block_n == 64
    assert gemm_small.default_tiles(2048, 8192, 2).block_n == 32


def test_fp32_weight_with_bf16_rows_is_rounded_as_the_model_would() -> None:
    """A float32 weight under bf16 activations: the weight is read as bf16 (what `w.to(x.dtype)` does)."""
    g = torch.Generator().manual_seed(8)
    x, w = (
        torch.randn(4, 64, generator=g).to(DEVICE, torch.bfloat16),
        torch.randn(48, 64, generator=g).to(DEVICE),
    )
    got = gemm_small.gemm_small(x, w, tiles=gemm_small.GemmTiles(16, 32))
    _check(got, *reference(x, w), "fp32 weight")


def test_strided_rows_of_x_and_a_transposed_residual() -> None:
    """x as a column slice of a wider buffer (row stride > K), as the q part of a fused q/k/v output is;
    a residual whose columns are not contiguous (copied, not misread)."""
    g = torch.Generator().manual_seed(9)
    wide, w = torch.randn(6, 200, generator=g).to(DEVICE), torch.randn(32, 64, generator=g).to(DEVICE)
    x, r = wide[:, 10:74], torch.randn(32, 6, generator=g).to(DEVICE).t()
    tiles = gemm_small.GemmTiles(16, 32)
    _check(gemm_small.gemm_small(x, w, tiles=tiles), *reference(x, w), "strided x")
    _check(gemm_small.gemm_small(x, w, residual=r, tiles=tiles), *reference(x, w, residual=r), "residual.t()")


def test_tuned_table_is_consulted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A `TUNED` entry replaces the default for its (N, K) only; an invalid one is refused when built."""
    monkeypatch.setitem(gemm_small.TUNED, (48, 80), gemm_small.GemmTiles(16, 16, swap_ab=True, split_k=2))
    assert gemm_small.tiles_for(48, 80, 4).split_k == 2
    assert gemm_small.tiles_for(48, 96, 4) == gemm_small.default_tiles(48, 96, 4)
    g = torch.Generator().manual_seed(10)
    x, w = torch.randn(3, 80, generator=g).to(DEVICE), torch.randn(48, 80, generator=g).to(DEVICE)
    _check(gemm_small.gemm_small(x, w), *reference(x, w), "tuned")


@pytest.mark.parametrize("m", [1, 65])
def test_refuses_row_counts_outside_2_to_64(m: int) -> None:
    with pytest.raises(ValueError, match=r"x must be \[M, K\] with 2 <= M <= 64"):
        gemm_small.gemm_small(torch.randn(m, 16, device=DEVICE), torch.randn(16, 16, device=DEVICE))


def test_refuses_bad_arguments_naming_them() -> None:
    """Each error names the argument; they are InferforgeErrors (a server answers them with a 4xx)."""
    assert issubclass(gemm_small.GemmSmallError, InferforgeError)
    x, w = torch.randn(4, 32, device=DEVICE), torch.randn(18, 32, device=DEVICE)
    with pytest.raises(ValueError, match="silu_pair needs an even N"):
        gemm_small.gemm_small(x, w[:17], silu_pair=True)
    with pytest.raises(ValueError, match=r"residual must be \[M, N\] = \[4, 18\]"):
        gemm_small.gemm_small(x, w, residual=torch.randn(4, 17, device=DEVICE))
    with pytest.raises(ValueError, match="residual must be"):
        gemm_small.gemm_small(x, w, residual=torch.randn(4, 18, device=DEVICE, dtype=torch.float16))
    with pytest.raises(ValueError, match=r"norm_weight must be \[K\]"):
        gemm_small.gemm_small(x, w, norm_weight=torch.randn(31, device=DEVICE))
    with pytest.raises(ValueError, match="weight must be"):
        gemm_small.gemm_small(x, torch.randn(18, 31, device=DEVICE))
    with pytest.raises(ValueError, match="bf16, fp16 or fp32"):
        gemm_small.gemm_small(x, w.to(torch.int8))
    with pytest.raises(ValueError, match="block_n must be a power of two >= 16"):
        gemm_small.GemmTiles(block_n=8)
    with pytest.raises(ValueError, match="split_k"):
        gemm_small.GemmTiles(split_k=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="PDL and CUDA graphs need a CUDA device")
@pytest.mark.parametrize("early", [False, True])
def test_a_layer_chain_under_pdl_in_a_cuda_graph_equals_it_without(
    early: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two layers' four products (norm + q/k/v, o + residual, norm + gate/up + SiLU, down + residual)
    captured in one graph with programmatic dependent launch: each kernel reads its weights before the
    wait and x after it, so the replay equals the same chain run without PDL, bit for bit."""
    g = torch.Generator().manual_seed(11)
    hidden, m = 256, 48

    def rand(*s: int) -> torch.Tensor:
        return (torch.randn(*s, generator=g) / 8).to("cuda", torch.bfloat16)

    shapes = ((384, hidden), (hidden, hidden), (1024, hidden), (hidden, 512), (hidden,), (hidden,))
    layers = [[rand(*s) + (len(s) == 1) for s in shapes] for _ in range(2)]  # norm weights near 1
    h0 = torch.randn(m, hidden, generator=g).to("cuda", torch.bfloat16)

    def chain() -> torch.Tensor:
        h = h0
        for qkv_w, o_w, up_w, down_w, n1, n2 in layers:
            qkv = gemm_small.gemm_small(h, qkv_w, norm_weight=n1)
            h = gemm_small.gemm_small(qkv[:, :hidden], o_w, residual=h)
            a = gemm_small.gemm_small(h, up_w, norm_weight=n2, silu_pair=True)
            h = gemm_small.gemm_small(a, down_w, residual=h, tiles=gemm_small.GemmTiles(32, 64, split_k=4))
        return h

    want = chain()
    monkeypatch.setitem(fused._LAUNCH, "pdl", True)
    monkeypatch.setitem(fused._LAUNCH, "early_trigger", early)
    chain()  # compiles the PDL variants outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = chain()
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got, want)
