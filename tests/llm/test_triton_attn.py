"""The Triton paged-decode kernel against the torch reference (gathers the block table), on CUDA or in
Triton's interpreter on the CPU where Triton is installed (CI's CPU environment has none: skipped there)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import triton_attn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("tile", [16, 64, 128])
def test_kernel_matches_the_reference_for_every_tile(tile: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Contexts of 1, 17, 64, 100 and 192 tokens over shuffled blocks: the first tile is read before the
    wait without the newest token, which is patched in after it; later tiles are read in the loop."""
    for key in ("small_batch", "large_batch"):
        monkeypatch.setitem(triton_attn.TILE, key, tile)
    dtype = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
    assert triton_attn.check_against_reference(DEVICE, dtype) < (1e-5 if dtype == torch.float32 else 2e-2)
