"""A Triton paged-attention kernel for decode: one program per (sequence, KV head), reading only live blocks.

The torch reference in `attention.py` gathers every block of the table, so its cost grows with max_model_len
and batch; this kernel walks each sequence's blocks up to its context length with an online softmax, the query
heads of one KV group together (grouped-query attention) so each key block is read once. CUDA only; the engine
uses it only after `verified_kernel` checked it against the reference on the live device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferforge.llm import attention, fused


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    BT,
    CTX,
    Out,
    scale,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_btb,
    stride_ob,
    stride_oh,
    G: tl.constexpr,
    GP: tl.constexpr,
    D: tl.constexpr,
    BS: tl.constexpr,
    TILE: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    # Before the wait (programmatic dependent launch): the context length and block table (sent before the
    # graph ran) and the first tile of keys and values except this step's own token, which the kernel just
    # before writes; it is read after the wait and patched in.
    ctx = tl.load(CTX + b)
    last = ctx - 1
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILE)
    blk = tl.load(BT + b * stride_btb + offs_t // BS, mask=offs_t < ctx, other=0)
    base = blk[:, None] * stride_kb + (offs_t % BS)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
    old = (offs_t < last)[:, None]
    k = tl.load(K + base, mask=old, other=0.0)
    v = tl.load(V + base, mask=old, other=0.0)
    lblk = tl.load(BT + b * stride_btb + last // BS)
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
    )
    lbase = lblk * stride_kb + (last % BS) * stride_ks + kvh * stride_kh + offs_d
    is_last = (offs_t == last)[:, None]
    k = tl.where(is_last, tl.load(K + lbase)[None, :], k)
    v = tl.where(is_last, tl.load(V + lbase)[None, :], v)
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(0, ctx, TILE):
        tok = start + offs_t
        tmask = tok < ctx
        if start > 0:
            blk = tl.load(BT + b * stride_btb + tok // BS, mask=tmask, other=0)
            base = (
                blk[:, None] * stride_kb + (tok % BS)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
            )
            k = tl.load(K + base, mask=tmask[:, None], other=0.0)
            v = tl.load(V + base, mask=tmask[:, None], other=0.0)
        s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)
        s = tl.where(tmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        alpha = tl.exp(m - m_new)
        l_sum = l_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(
        Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=gmask[:, None],
    )


# Keys per loop iteration, warps and software pipelining by batch size. At batch <= 4 the kernel runs a few
# programs, so its time is the latency of its sequential tiles: one large tile (bench_decode.py b1ab, run 4:
# 256 keys / 8 warps 1,041 tok/s, 128 / 4 1,029, 64 / 4 997). At larger batches there are programs enough to
# fill the GPU; 64 keys measured best (b64ab, run 5); keeping the next tile's loads in flight while computing
# this one measured no faster (run 6) and was removed.
TILE = {"small_batch": 256, "large_batch": 64}
WARPS = {"small_batch": 8, "large_batch": 4}


@torch.library.custom_op("inferforge::paged_decode_attention", mutates_args=())
def _paged_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    b, heads, d = q.shape
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    q = q.contiguous()
    out = torch.empty_like(q)
    _paged_decode_kernel[(b, kv_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        scale,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        G=group,
        GP=max(16, triton.next_power_of_2(group)),
        D=d,
        BS=block_size,
        TILE=TILE["small_batch"] if b <= 4 else TILE["large_batch"],
        PDL=fused.pdl_on(),
        num_warps=WARPS["small_batch"] if b <= 4 else WARPS["large_batch"],
        **fused.launch_options(),
    )
    return out


@_paged_decode_op.register_fake
def _(q, k_cache, v_cache, block_tables, context_lens, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q: [B, heads, d]; caches [blocks, block_size, kv_heads, d]; same contract as the torch reference.

    A custom op, so torch.compile treats the kernel as one opaque call inside the fused decode graph.
    """
    return _paged_decode_op(q, k_cache, v_cache, block_tables, context_lens, float(scale))


def check_against_reference(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> float:
    """Max abs difference to the torch reference on random paged data (ragged lengths, shuffled blocks)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, heads, kv_heads, d, bs, max_blocks = 5, 32, 8, 64, 16, 12
    k = torch.randn(80, bs, kv_heads, d, generator=gen).to(device, dtype)
    v = torch.randn(80, bs, kv_heads, d, generator=gen).to(device, dtype)
    q = torch.randn(b, heads, d, generator=gen).to(device, dtype)
    bt = torch.randperm(79, generator=gen)[: b * max_blocks].add(1).view(b, max_blocks).to(device)
    ctx = torch.tensor([1, 17, 64, 100, 192], device=device)
    ref = attention.decode_attention_torch(q, k, v, bt, ctx, d**-0.5)
    got = paged_decode_attention(q, k, v, bt, ctx, d**-0.5)
    return (ref.float() - got.float()).abs().max().item()


def verified_kernel(device: torch.device, tolerance: float = 2e-2):  # -> DecodeFn | None
    """The kernel if it matches the reference on this device, else None (the engine keeps the torch path)."""
    return paged_decode_attention if check_against_reference(device) <= tolerance else None
