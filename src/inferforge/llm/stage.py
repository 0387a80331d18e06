"""A decode step's inputs sent by one small kernel that reads the pinned staging buffer in place.

The batch-1 loop spends 25-32 us a step outside its CUDA graph in every format (V7-V8 of 2026-11-24,
`benchmarks/llm/loop_gap_probe.py`, `host_bound_probe.py`): a host-to-device copy of the inputs (2.3 us), a
device-to-device copy of the carried token (1.1 us) and ~5 us of idle device after each copy engine hand-off.
Here one kernel loads the inputs from pinned host memory over PCIe (zero copy: the buffer is mapped into the
device's address space) and writes the carried tokens over the first rows, so the two copies and their gaps
become one launch. Only for small buffers (`MAX_BYTES`): a kernel reading megabytes over PCIe would be slower
than the copy engine.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024  # int64 elements a program
MAX_BYTES = 64 * 1024


@triton.jit
def _stage_kernel(HOST, DEV, CARRY, end, carried, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < end
    # volatile: read host memory every time, never a line the device cached from an earlier step
    v = tl.load(HOST + offs, mask=inside, other=0, volatile=True)
    if carried > 0:
        c = tl.load(CARRY + offs, mask=offs < carried, other=0)
        v = tl.where(offs < carried, c, v)
    tl.store(DEV + offs, v, mask=inside)


def fits(end: int) -> bool:
    return 0 < end * 8 <= MAX_BYTES


def stage(host: torch.Tensor, dev: torch.Tensor, end: int, carry_ids: torch.Tensor | None) -> None:
    """dev[:end] = host[:end], then dev[:k] = carry_ids (k its length), in one launch on the current stream.

    `host` is pinned (or, in Triton's interpreter, any CPU tensor); `dev` and `carry_ids` are int64 on the
    device. The host must not rewrite `host[:end]` until this launch has run (the runner's two buffers in
    turn keep that, as they do for the asynchronous copy this replaces)."""
    carried = 0 if carry_ids is None else carry_ids.shape[0]
    if carried > end:
        raise ValueError(f"{carried} carried tokens for {end} staged elements")
    grid = (triton.cdiv(end, BLOCK),)
    _stage_kernel[grid](host, dev, carry_ids if carry_ids is not None else dev, end, carried, BLOCK=BLOCK)
