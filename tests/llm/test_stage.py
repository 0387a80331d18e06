"""`llm/stage.py`: a decode step's inputs and carried tokens sent by one kernel reading the staging buffer.

On a CUDA device the host buffer is pinned and read in place; on the CPU the kernel runs in Triton's
interpreter where Triton is installed (CI's CPU environment has none, so there these tests skip).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import stage

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(("end", "carried"), [(1, 0), (1, 1), (300, 7), (2 * stage.BLOCK + 5, 64)])
def test_stage_copies_the_buffer_then_the_carried_rows(end: int, carried: int) -> None:
    """dev[:end] takes host[:end], then dev[:k] the carried ids; nothing past `end` is written (several
    programs when `end` spans blocks, a ragged last one)."""
    g = torch.Generator().manual_seed(end + carried)
    host = torch.randint(0, 2**40, (end + 50,), generator=g, dtype=torch.long)
    if DEVICE == "cuda":
        host = host.pin_memory()
    dev = torch.full((end + 50,), -1, dtype=torch.long, device=DEVICE)
    carry = torch.randint(0, 2**40, (carried,), generator=g, dtype=torch.long).to(DEVICE) if carried else None
    stage.stage(host, dev, end, carry)
    want = host[:end].clone()
    if carry is not None:
        want[:carried] = carry.cpu()
    assert torch.equal(dev[:end].cpu(), want)
    assert bool((dev[end:] == -1).all())


def test_stage_refuses_more_carried_rows_than_staged() -> None:
    host, dev = torch.zeros(4, dtype=torch.long), torch.zeros(4, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="carried"):
        stage.stage(host, dev, 2, torch.zeros(3, dtype=torch.long, device=DEVICE))


def test_only_small_buffers_take_the_kernel() -> None:
    assert stage.fits(320) and not stage.fits(0) and not stage.fits(stage.MAX_BYTES // 8 + 1)
