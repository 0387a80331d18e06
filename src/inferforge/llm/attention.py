"""Attention over the paged KV cache: a prefill path (any chunk, any prior context) and a batched decode path.

The torch versions here are the reference and run anywhere; on CUDA the decode path may use the Triton kernel
in `triton_attn.py`, chosen per engine only after it matched this reference on the device.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    """One sequence's slice of a flat prefill batch: its queries are rows q_start..q_start+q_len."""

    q_start: int
    q_len: int
    ctx_len: int  # tokens in the cache for this sequence after this chunk is written
    block_ids: torch.Tensor  # long, the blocks holding its first ctx_len tokens


@dataclass
class AttnMeta:
    """Where the step's new keys go (slot_mapping) and what each query may attend to."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each new token
    prefill: list[PrefillSeq] | None = None  # set for a prefill step
    block_tables: torch.Tensor | None = None  # [B, max_blocks] int32, decode step
    context_lens: torch.Tensor | None = None  # [B] int32, decode step (including the new token)
    decode_fn: Callable[..., torch.Tensor] | None = (
        None  # a faster kernel with decode_attention_torch's contract
    )


def write_cache(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
):
    """k_cache: [num_blocks, block_size, kv_heads, head_dim]; k: [T, kv_heads, head_dim]."""
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v)


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    seqs: list[PrefillSeq],
    scale: float,
) -> torch.Tensor:
    """q: [T, heads, d]. A fresh prompt attends to its own new keys (causal); a later chunk reads the
    cache."""
    out = torch.empty_like(q)
    for s in seqs:
        qs = q[s.q_start : s.q_start + s.q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q, d]
        if s.ctx_len == s.q_len:
            ks = k_new[s.q_start : s.q_start + s.q_len]
            vs = v_new[s.q_start : s.q_start + s.q_len]
            mask, causal = None, True
        else:
            ks = k_cache[s.block_ids].flatten(0, 1)[: s.ctx_len]
            vs = v_cache[s.block_ids].flatten(0, 1)[: s.ctx_len]
            q_pos = torch.arange(s.ctx_len - s.q_len, s.ctx_len, device=q.device)
            mask = torch.arange(s.ctx_len, device=q.device)[None, :] <= q_pos[:, None]
            causal = False
        o = F.scaled_dot_product_attention(
            qs,
            ks.transpose(0, 1).unsqueeze(0),
            vs.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=causal,
            scale=scale,
            enable_gqa=True,
        )
        out[s.q_start : s.q_start + s.q_len] = o[0].transpose(0, 1)
    return out


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
