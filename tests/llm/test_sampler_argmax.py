"""The two-pass argmax used for greedy decoding on the GPU equals torch.argmax, ties included."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter where there is no GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

from inferforge.llm.sampler import argmax_rows


@pytest.mark.parametrize("width", [128256, 5000, 4097])
def test_two_pass_argmax_equals_argmax_with_ties(width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(6, width, generator=gen)
    x[1] = 0.0  # all tied: index 0
    x[2, [7, width - 1]] = 50.0  # tie across chunks: the first
    x[3, [width - 3, width - 2]] = 50.0  # tie inside the last (padded) chunk
    x[4, -1] = 60.0
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("width", [128256, 5000, 4097, 2048, 7])
def test_one_launch_argmax_equals_argmax_with_ties(width: int) -> None:
    """`argmax.argmax_last` (Triton: the GPU, or its interpreter here): ties inside and across chunks go to
    the first index, all-equal rows to 0, a row of NaNs to a valid id; twice, so the arrival counters are
    back at zero after each call."""
    pytest.importorskip("triton")
    from inferforge.llm.argmax import argmax_last

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(width)
    x = torch.randn(6, width, generator=gen)
    x[1] = 0.0
    x[2, [0, width - 1]] = 50.0
    x[3, -1] = 60.0
    x[4] = float("-inf")
    want = x.argmax(dim=-1)
    x[5] = float("nan")
    for _ in range(2):
        got = argmax_last(x.to(device)).cpu()
        assert torch.equal(got[:5], want[:5]) and 0 <= got[5] < width
