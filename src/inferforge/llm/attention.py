"""Attention over the paged KV cache: a prefill path (any chunk, any prior context) and a batched decode path.

The torch versions here are the reference and run anywhere; on CUDA the decode path may use the Triton kernel
in `triton_attn.py`, chosen per engine only after it matched this reference on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

# Prompt attention never runs on cuDNN's backend, torch's first choice on the H100 for these shapes: it builds
# a plan for every new shape, 48-91 ms the first time a prompt count or context length is seen (run I6 of
# 2026-11-23, `benchmarks/llm/shape_probe.py`), so a server's prompt steps, whose shapes follow arrivals, kept
# paying it (55-90 ms steps in the I5 trace). Flash and memory-efficient attention build nothing.
_NO_PLAN = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _no_plan_backends(device: torch.device) -> contextlib.AbstractContextManager:
    return sdpa_kernel(_NO_PLAN) if device.type == "cuda" else contextlib.nullcontext()


# Whether the Triton decode attention reads its first tile of keys and values before `griddepcontrol.wait`
# (all but the row's own newest token, which the kernel before writes; that one is patched in after the
# wait). Off inside `late_tile`: rows that are several positions of one sequence (speculative verification)
# attend to keys that the rows before them write in the same step. Here, not in `triton_attn`, so that code
# without Triton can switch it.
EARLY_TILE = {"on": True}


@contextlib.contextmanager
def late_tile() -> Iterator[None]:
    """Launch (or capture) the decode attention with its first tile read after the wait."""
    EARLY_TILE["on"] = False
    try:
        yield
    finally:
        EARLY_TILE["on"] = True


@dataclass
class PrefillSeq:
    """One sequence's slice of a flat prefill batch: its queries are rows q_start..q_start+q_len."""

    q_start: int
    q_len: int
    ctx_len: int  # tokens in the cache for this sequence after this chunk is written
    block_ids: torch.Tensor | None  # long, the blocks holding its first ctx_len tokens (None when fresh)


@dataclass
class FreshGroup:
    """Fresh prompts (nothing cached before them) of similar length, attended in one padded call.

    idx [n, L]: the flat row of each (prompt, position), padding repeats a prompt's last row; rows: the flat
    rows of all real positions; take: where each of them sits in the padded [n * L] output. A causal mask is
    all a group needs: a real query at position i < len sees keys 0..i, never the padding after len; padded
    queries see padding, and their outputs are dropped. A dense group (prompts of one length, back to back
    in the batch) is a plain view instead: `start` is its first row, `shape` (n, L), and no index exists."""

    idx: torch.Tensor | None
    rows: torch.Tensor | None
    take: torch.Tensor | None
    start: int | None = None
    shape: tuple[int, int] = (0, 0)


@dataclass
class VarlenMeta:
    """A step's layout on the device for varlen attention (`triton_varlen_attn` says what each tensor
    holds), and the function that attends with it (the kernel, or `varlen_attention_torch`)."""

    cu_q: torch.Tensor
    ctx: torch.Tensor
    block_tables: torch.Tensor
    prog_seq: torch.Tensor
    prog_q0: torch.Tensor
    fn: Callable[..., torch.Tensor]

    def attend(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, scale: float
    ) -> torch.Tensor:
        return self.fn(q, k_cache, v_cache, self.cu_q, self.ctx, self.block_tables, self.prog_seq,
                       self.prog_q0, scale)  # fmt: skip


@dataclass
class AttnMeta:
    """Where the step's new keys go (slot_mapping) and what each query may attend to."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token
    prefill: list[PrefillSeq] | None = None  # set for a prefill step: the sequences attended one by one
    fresh_groups: list[FreshGroup] | None = None  # prefill: fresh prompts attended in padded groups
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, decode step
    context_lens: torch.Tensor | None = None  # [B] int32, decode step (including the new token)
    decode_fn: Callable[..., torch.Tensor] | None = (
        None  # a faster kernel with decode_attention_torch's contract
    )
    num_decode: int = (
        0  # prefill step: its first rows are decode rows (block_tables, context_lens cover them)
    )
    varlen: VarlenMeta | None = None  # a step whose whole layout is on the device (graph-captured prompts)


def write_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
):
    """k_cache: [num_blocks, block_size, kv_heads, head_dim]; k: [T, kv_heads, head_dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def fresh_groups(seqs: list[PrefillSeq], device: torch.device) -> tuple[list[FreshGroup], list[PrefillSeq]]:
    """Group fresh prompts whose lengths round up to the same power of two (padding wastes < 2x of their
    attention, none of the matrix products); returns the groups and the sequences left to attend alone.
    One SDPA call per group instead of one per prompt: a step of 16 fresh prompts was launch-bound."""
    buckets: dict[int, list[PrefillSeq]] = {}
    alone: list[PrefillSeq] = []
    for s in seqs:
        if s.ctx_len == s.q_len and s.q_len > 1:
            buckets.setdefault(1 << (s.q_len - 1).bit_length(), []).append(s)
        else:
            alone.append(s)
    groups = []
    for members in buckets.values():
        if len(members) == 1:
            alone.extend(members)
            continue
        width = max(s.q_len for s in members)
        if all(
            s.q_len == width and s.q_start == members[0].q_start + i * width for i, s in enumerate(members)
        ):
            groups.append(FreshGroup(None, None, None, members[0].q_start, (len(members), width)))
            continue
        idx = [s.q_start + min(j, s.q_len - 1) for s in members for j in range(width)]
        rows = [s.q_start + j for s in members for j in range(s.q_len)]
        take = [g * width + j for g, s in enumerate(members) for j in range(s.q_len)]
        flat = torch.tensor(idx + rows + take, dtype=torch.long)
        if device.type == "cuda":
            flat = flat.pin_memory().to(device, non_blocking=True)
        a, b = len(idx), len(idx) + len(rows)
        groups.append(
            FreshGroup(flat[:a].view(len(members), width), flat[a:b], flat[b:], shape=(len(members), width))
        )
    return groups, alone


def _attend_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: FreshGroup, scale: float,
                  out: torch.Tensor) -> None:  # fmt: skip
    n, width = g.shape
    if g.start is not None:  # a dense group: views, no gather and no scatter (8,192 rows: 2.4 ms a step)
        rows = slice(g.start, g.start + n * width)
        qs, ks, vs = (x[rows].view(n, width, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
    else:
        assert g.idx is not None and g.rows is not None and g.take is not None
        qs, ks, vs = (x[g.idx].transpose(1, 2) for x in (q, k, v))  # [n, heads, L, d]
    o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    flat = o.transpose(1, 2).reshape(n * width, *q.shape[1:])
    if g.start is not None:
        out[g.start : g.start + n * width] = flat
    else:
        out[g.rows] = flat[g.take]


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[PrefillSeq],
    scale: float,
    groups: list[FreshGroup] | None = None,
) -> torch.Tensor:
    """q: [T, heads, d]. Fresh prompts attend to their own new keys (causal), in padded groups where given;
    a later chunk reads the cache."""
    out = torch.empty_like(q)
    with _no_plan_backends(q.device):
        for g in groups or ():
            _attend_group(q, k_new, v_new, g, scale, out)
        for s in seqs:
            _attend_seq(q, k_new, v_new, k_cache, v_cache, s, scale, out)
    return out


def _attend_seq(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, s: PrefillSeq, scale: float, out: torch.Tensor) -> None:  # fmt: skip
    qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
    if s.ctx_len == s.q_len:
        ks = k_new[s.q_start : s.q_start + s.q_len]
        vs = v_new[s.q_start : s.q_start + s.q_len]
        mask, causal = None, True
    else:
        assert s.block_ids is not None
        ks = k_cache[s.block_ids].flatten(0, 1)[: s.ctx_len]
        vs = v_cache[s.block_ids].flatten(0, 1)[: s.ctx_len]
        q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)
        mask = torch.arange(s.ctx_len, device=q.device)[None, :] <= q_pos[:, None]
        causal = False
        if q.is_cuda:  # memory-efficient attention takes a mask but not grouped heads: repeat them
            ks, vs = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (ks, vs))
    o = F.scaled_dot_product_attention(
        qs,
        ks.transpose(0, 1).unsqueeze(0),
        vs.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=ks.shape[1] != q.shape[1],
    )
    out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)


def decode_attention_torch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, heads, d], one query per sequence. Gathers every block in the table, masks past context_len."""
    b = q.shape[0]
    k = k_cache[block_tables].flatten(1, 2)  # [B, L, kv_heads, d]
    v = v_cache[block_tables].flatten(1, 2)
    mask = torch.arange(k.shape[1], device=q.device)[None, :] < context_lens[:, None]
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask.view(b, 1, 1, -1),
        scale=scale,
        enable_gqa=True,
    )
    return o.squeeze(2)


DecodeFn = Callable[..., torch.Tensor]


# Query tokens per program of varlen attention: with the GQA group (padded to a power of two) they make the
# rows of its score tile, which needs at least 16.
VARLEN_BLOCK_Q = 16


def varlen_block_q(heads: int, kv_heads: int) -> int:
    group = heads // kv_heads
    return max(VARLEN_BLOCK_Q, 16 // (1 << (group - 1).bit_length()))


def varlen_programs(q_lens: np.ndarray, bq: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """(prog_seq, prog_q0): each program's sequence and first query, for chunks of `q_lens` queries and
    `bq` queries a program, padded to `capacity` programs with sequence -1 (nothing to do)."""
    per = -(-q_lens // bq)
    n = int(per.sum())
    if n > capacity:
        raise ValueError(f"{n} attention programs exceed the capacity {capacity}")
    seq = np.full(capacity, -1, dtype=np.int64)
    q0 = np.zeros(capacity, dtype=np.int64)
    seq[:n] = np.repeat(np.arange(len(q_lens)), per)
    q0[:n] = (np.arange(n) - np.repeat(np.cumsum(per) - per, per)) * bq
    return seq, q0


def varlen_attention_torch(
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
    """The reference for `triton_varlen_attn` (and its CPU stand-in): per sequence, its chunk's queries over
    its cached keys, causal by absolute position. Reads the layout back to the host, so no graph holds it;
    the program arrays are the kernel's business and unused here. Rows outside every chunk are zero."""
    out = torch.zeros_like(q)
    starts, lens = cu_q.tolist(), ctx.tolist()
    group = q.shape[1] // k_cache.shape[2]
    for s, n_ctx in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b <= a:
            continue
        blocks = block_tables[s, : -(-n_ctx // k_cache.shape[1])]
        k = k_cache[blocks].flatten(0, 1)[:n_ctx].repeat_interleave(group, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n_ctx].repeat_interleave(group, dim=1)
        qpos = torch.arange(n_ctx - (b - a), n_ctx, device=q.device)
        mask = torch.arange(n_ctx, device=q.device)[None, :] <= qpos[:, None]
        o = F.scaled_dot_product_attention(
            q[a:b].transpose(0, 1).float(), k.transpose(0, 1).float(), v.transpose(0, 1).float(),
            attn_mask=mask, scale=scale,
        )  # fmt: skip
        out[a:b] = o.transpose(0, 1).to(q.dtype)
    return out
