"""The streaming batch-1 GEMV (`llm/gemv_stream.py`) against `gemv_check`'s torch reference.

Runs on a CUDA device, or on the CPU through Triton's interpreter where Triton is installed (CI's CPU
environment has none, so there these tests skip).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import gemv_check, gemv_stream

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("block_n", "programs", "stages"), [(2, 3, 2), (8, 5, 3), (4, 64, 4)])
@pytest.mark.parametrize("wtype", ["fp32", "int8"])
def test_every_epilogue_matches_the_reference(block_n: int, programs: int, stages: int, wtype: str) -> None:
    """More tiles than programs (each program walks several), the norm prologue, residual add, SiLU pairs,
    a per-channel scale on int8 weights, fp64 out."""
    n, k = 48, 64
    g = torch.Generator().manual_seed(block_n * programs)
    x, r, nw, w = (torch.randn(*s, generator=g).to(DEVICE) for s in ((1, k), (1, n), (k,), (n, k)))
    extra: dict = {}
    if wtype == "int8":
        scale = w.abs().amax(1) / 127
        w = (w / scale[:, None]).round().to(torch.int8)
        extra = {"scale": scale}
    cases = [
        {},
        {"norm_weight": nw, "eps": 1e-5},
        {"residual": r},
        {"norm_weight": nw, "eps": 1e-5, "silu_pair": True},
        {"out_dtype": torch.float64},
    ]
    for kw in cases:
        got = gemv_stream.stream_gemv(x, w, block_n=block_n, programs=programs, stages=stages, **extra, **kw)
        want = gemv_check.gemv_reference(x, w, **extra, **kw)
        assert got.shape == want.shape and got.dtype == want.dtype, kw
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_refuses_what_it_cannot_tile() -> None:
    with pytest.raises(ValueError, match="power of two"):
        gemv_stream.stream_gemv(torch.randn(1, 48, device=DEVICE), torch.randn(16, 48, device=DEVICE))
    with pytest.raises(ValueError, match="block_n"):
        gemv_stream.stream_gemv(
            torch.randn(1, 64, device=DEVICE), torch.randn(12, 64, device=DEVICE), block_n=8
        )
