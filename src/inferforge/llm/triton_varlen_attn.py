"""Varlen paged attention: prompt chunks and decode rows of one step in one kernel, its layout on the device.

The eager prefill path (`attention.prefill_attention`) groups prompts on the host and calls SDPA per group,
so its launches depend on the step's shapes and it cannot be captured in a CUDA graph; a mixed step of one
128-token prompt and 63 decode rows then cost ~12 ms of host launches for ~2 ms of GPU work (trace of run
I9, 2026-11-23). Here every query reads its keys from the paged cache (this step's already written), and
where each program works comes from device tensors: the runner fills them, so one graph per token bucket
replays any mix of chunks, prior contexts and decode rows.

Layout (all long tensors on the device):
- `cu_q` [S + 1]: query row where each sequence's chunk starts in the flat batch (a padded sequence has an
  empty chunk);
- `ctx` [S]: the sequence's tokens in the cache after this step's are written (its chunk is the last q_len);
- `block_tables` [S, max_blocks];
- `prog_seq`, `prog_q0` [P]: each program's sequence (-1: nothing to do) and first query within the chunk.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from inferforge.llm.attention import varlen_attention_torch, varlen_block_q, varlen_programs

TILE = 64  # keys per loop iteration


@triton.jit
def _varlen_kernel(
    Q, K, V, Out, BT, CU_Q, CTX, PROG_SEQ, PROG_Q0, scale,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_btb, stride_ot, stride_oh,
    G: tl.constexpr, GP: tl.constexpr, BQ: tl.constexpr, D: tl.constexpr, BS: tl.constexpr,
    TILE: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    s = tl.load(PROG_SEQ + pid)
    if s < 0:
        return
    q0 = tl.load(PROG_Q0 + pid)
    qs = tl.load(CU_Q + s)
    q_len = tl.load(CU_Q + s + 1) - qs
    ctx = tl.load(CTX + s)
    prior = ctx - q_len  # tokens cached before this chunk
    offs_m = tl.arange(0, BQ * GP)
    qi = q0 + offs_m // GP  # query within the chunk
    head = offs_m % GP
    rmask = (qi < q_len) & (head < G)
    offs_d = tl.arange(0, D)
    q = tl.load(
        Q + (qs + qi)[:, None] * stride_qt + (kvh * G + head)[:, None] * stride_qh + offs_d[None, :],
        mask=rmask[:, None], other=0.0,
    )  # fmt: skip
    qpos = prior + qi  # absolute position: sees keys 0..qpos
    hi = tl.minimum(ctx, prior + q0 + BQ)  # one past the block's last query
    offs_t = tl.arange(0, TILE)
    bt_row = BT + s * stride_btb
    m = tl.full([BQ * GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([BQ * GP], tl.float32)
    acc = tl.zeros([BQ * GP, D], tl.float32)
    for start in range(0, hi, TILE):
        t = start + offs_t
        tmask = t < hi
        blk = tl.load(bt_row + t // BS, mask=tmask, other=0)
        base = blk[:, None] * stride_kb + (t % BS)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
        k = tl.load(K + base, mask=tmask[:, None], other=0.0)
        v = tl.load(V + base, mask=tmask[:, None], other=0.0)
        sc = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)
        sc = tl.where((t[None, :] <= qpos[:, None]) & tmask[None, :], sc, float("-inf"))
        m_new = tl.maximum(m, tl.max(sc, 1))  # key 0 is in every row's first tile: finite from then on
        p = tl.exp(sc - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        Out + (qs + qi)[:, None] * stride_ot + (kvh * G + head)[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty), mask=rmask[:, None],
    )  # fmt: skip


def varlen_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    cu_q: torch.Tensor,
    ctx: torch.Tensor,
    block_tables: torch.Tensor,
    prog_seq: torch.Tensor,
    prog_q0: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, d]; caches [blocks, block_size, kv_heads, d] holding this step's keys already. Rows of q
    outside every chunk (padding) are left unwritten."""
    heads, d = q.shape[1:]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    gp = triton.next_power_of_2(group)
    bq = varlen_block_q(heads, kv_heads)
    out = torch.empty_like(q)
    _varlen_kernel[(prog_seq.shape[0], kv_heads)](
        q, k_cache, v_cache, out, block_tables, cu_q, ctx, prog_seq, prog_q0, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        G=group, GP=gp, BQ=bq, D=d, BS=block_size, TILE=TILE, num_warps=4,
    )  # fmt: skip
    return out


def check_against_reference(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Max abs difference to the reference on random paged data: fresh prompts, a chunk after a cached
    prefix, decode rows (one query) and an empty padded sequence, with shuffled blocks."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    heads, kv_heads, d, bs = 32, 8, 64, 16
    q_lens = [37, 1, 128, 0, 1, 70, 16]
    ctxs = [37, 300, 200, 0, 1, 70, 1000]
    max_blocks = -(-max(ctxs) // bs)
    n_blocks = len(ctxs) * max_blocks + 1
    k = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    v = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    t = sum(q_lens) + 5  # padding rows at the end
    q = torch.randn(t, heads, d, generator=gen).to(device, dtype)
    bt = torch.randperm(n_blocks - 1, generator=gen).add(1).view(len(ctxs), max_blocks).to(device)
    cu = torch.tensor(np.concatenate([[0], np.cumsum(q_lens)]), device=device)
    ctx = torch.tensor(ctxs, device=device)
    bq = varlen_block_q(heads, kv_heads)
    seq, q0 = varlen_programs(np.array(q_lens), bq, t // bq + len(q_lens))
    ps, pq = torch.tensor(seq, device=device), torch.tensor(q0, device=device)
    n = sum(q_lens)
    ref = varlen_attention_torch(q, k, v, cu, ctx, bt, ps, pq, d**-0.5)[:n].float()
    got = varlen_attention(q, k, v, cu, ctx, bt, ps, pq, d**-0.5)[:n].float()
    return (ref - got).abs().max().item()


def verified_kernel(device: torch.device, tolerance: float = 2e-2):  # -> the kernel or None
    """The kernel if it matches the reference on this device, else None (prompt steps stay eager)."""
    return varlen_attention if check_against_reference(device) <= tolerance else None
