"""The two-pass argmax used for greedy decoding on the GPU equals torch.argmax, ties included."""

from __future__ import annotations

import pytest
import torch

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
