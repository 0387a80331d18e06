"""Greedy decoding's argmax over a vocabulary in one kernel launch (CUDA; Triton's interpreter elsewhere).

`sampler.argmax_rows` took five launches on the GPU for it (a chunked max, an argmax over the chunks, a
gather, an add and a multiply): ~22 us of a batch-1 bf16 step of ~970 us, plus ~5 us of idle device between
them (`benchmarks/llm/loop_gap_probe.py`, run T5 on the H100). Here each program reduces one chunk of one
row to its maximum and the first index holding it, counts itself in on the row's arrival counter, and the
last to arrive picks the first chunk holding the row's maximum (the split-K pattern of `gemv._split_sum`);
it puts the counter back to zero for the next call. Ties go to the first index, as `torch.argmax`'s do.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 2048  # a row's elements a program
_BIG = 2**31 - 1
_SCRATCH: dict[tuple[torch.device, int, int, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


@triton.jit
def _argmax_kernel(X, VALS, IDX, CNT, OUT, width, stride, CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    chunks = tl.num_programs(1)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    x = tl.load(X + row.to(tl.int64) * stride + offs, mask=offs < width, other=float("-inf"))
    best = tl.max(x, 0)
    first = tl.min(tl.where(x == best, offs, 2147483647), 0)
    slot = row * chunks + chunk
    tl.store(VALS + slot, best)
    tl.store(IDX + slot, first)
    tl.debug_barrier()  # every thread's stores are out before the count's release
    done = tl.atomic_add(CNT + row, 1, sem="acq_rel", scope="gpu")
    if done == chunks - 1:  # the partials are read only after the count says they are all there
        cs = tl.arange(0, CHUNKS_P2)
        have = cs < chunks
        vals = tl.load(VALS + row * chunks + cs, mask=have, other=float("-inf"), cache_modifier=".cg")
        idx = tl.load(IDX + row * chunks + cs, mask=have, other=2147483647, cache_modifier=".cg")
        top = tl.max(vals, 0)
        pick = tl.min(tl.where(vals == top, idx, 2147483647), 0)
        tl.store(OUT + row, tl.minimum(pick, width - 1).to(tl.int64))  # a row of NaNs still gives a token
        tl.store(CNT + row, 0)


def _scratch(device: torch.device, rows: int, chunks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials and arrival counters per (device, stream, shape): calls on one stream run one after another,
    so they can share them; two streams (two engines' threads) get their own."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream, rows, chunks)
    if key not in _SCRATCH:
        vals = torch.empty(rows * chunks, dtype=torch.float32, device=device)
        idx = torch.empty(rows * chunks, dtype=torch.int32, device=device)
        _SCRATCH[key] = (vals, idx, torch.zeros(rows, dtype=torch.int32, device=device))
    return _SCRATCH[key]


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) of a 2-D float tensor whose rows are contiguous: int64 [rows]."""
    rows, width = x.shape
    if x.stride(-1) != 1 or width >= _BIG:
        raise ValueError(f"argmax_last needs contiguous rows of under 2^31 elements, got {tuple(x.shape)}")
    chunks = triton.cdiv(width, CHUNK)
    vals, idx, count = _scratch(x.device, rows, chunks)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    _argmax_kernel[(rows, chunks)](
        x, vals, idx, count, out, width, x.stride(0), CHUNK=CHUNK, CHUNKS_P2=triton.next_power_of_2(chunks),
        num_warps=8,
    )  # fmt: skip
    return out
