"""The Triton varlen paged-attention kernel of graph-captured prompt steps against the torch reference, on
CUDA or in Triton's interpreter on the CPU where Triton is installed (CI's CPU environment has none: skipped
there)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import attention, triton_varlen_attn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
TOL = 1e-5 if DEVICE.type == "cpu" else 2e-2


def test_matches_reference_on_mixed_layout() -> None:
    """Fresh prompts, a chunk after a cached prefix, decode rows, an empty sequence, padding rows."""
    assert triton_varlen_attn.check_against_reference(DEVICE, DTYPE) <= TOL


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2), (14, 2)])
def test_group_sizes_including_one_not_a_power_of_two(heads: int, kv_heads: int) -> None:
    gen = torch.Generator().manual_seed(1)
    d, bs, q_lens, ctxs = 16, 16, [5, 1, 33], [5, 20, 40]
    n_blocks = 3 * 3 + 1
    k = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(DEVICE, DTYPE)
    t = sum(q_lens)
    q = torch.randn(t, heads, d, generator=gen).to(DEVICE, DTYPE)
    bt = torch.randperm(n_blocks - 1, generator=gen).add(1).view(3, 3).to(DEVICE)
    cu = torch.tensor([0, *np.cumsum(q_lens)], device=DEVICE)
    ctx = torch.tensor(ctxs, device=DEVICE)
    bq = attention.varlen_block_q(heads, kv_heads)
    seq, q0 = attention.varlen_programs(np.array(q_lens), bq, 8)
    ps, pq = torch.tensor(seq, device=DEVICE), torch.tensor(q0, device=DEVICE)
    ref = attention.varlen_attention_torch(q, k, v, cu, ctx, bt, ps, pq, d**-0.5)
    got = triton_varlen_attn.varlen_attention(q, k, v, cu, ctx, bt, ps, pq, d**-0.5)
    assert (ref.float() - got.float()).abs().max().item() <= TOL
