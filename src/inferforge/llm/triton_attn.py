"""A Triton paged-attention kernel for decode: programs per (sequence, KV head), reading only live blocks.

The torch reference in `attention.py` gathers every block of the table, so its cost grows with max_model_len
and batch; this kernel walks each sequence's blocks up to its context length with an online softmax, the query
heads of one KV group together (grouped-query attention) so each key block is read once. CUDA only; the engine
uses it only after `verified_kernel` checked it against the reference on the live device.

Split-KV (flash-decoding) in the same launch: small batches get several programs per (sequence, KV head),
each a slice of the context; each writes its partial (max, sum, unnormalised output) and counts itself in on
an atomic counter, and the last to arrive merges them and zeroes the counter, so CUDA-graph replays need no
reset kernel. Contexts shorter than MIN_SPLIT_TOKENS keep one program and write their output directly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from inferforge.llm import attention, fused


@triton.jit
def _attend(q, k, v, tmask, m, l_sum, acc, scale):
    """One tile of the online softmax: scores, running max and sum, unnormalised output."""
    s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)
    s = tl.where(tmask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    p = tl.exp(s - m_new[:, None])
    alpha = tl.exp(m - m_new)
    l_sum = l_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_sum, acc


@triton.jit
def _combine(ML, ACC, first, n_active, offs_g, gmask, offs_d, GP: tl.constexpr, D: tl.constexpr):
    """Log-sum-exp merge of the partials of one (sequence, KV head), splits `first` .. `first + n_active`.
    Loads bypass L1 (`.cg`): the partials were written by other programs, made visible by the counter."""
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for i in range(0, n_active):
        row = first + i
        m_i = tl.load(ML + (row * 2) * GP + offs_g, mask=gmask, other=0.0, cache_modifier=".cg")
        l_i = tl.load(ML + (row * 2 + 1) * GP + offs_g, mask=gmask, other=1.0, cache_modifier=".cg")
        a_i = tl.load(
            ACC + (row * GP + offs_g[:, None]) * D + offs_d[None, :], mask=gmask[:, None], other=0.0,
            cache_modifier=".cg",
        )  # fmt: skip
        m_new = tl.maximum(m, m_i)
        alpha = tl.exp(m - m_new)
        beta = tl.exp(m_i - m_new)
        l_sum = l_sum * alpha + l_i * beta
        acc = acc * alpha[:, None] + a_i * beta[:, None]
        m = m_new
    return acc / l_sum[:, None]


@triton.jit
def _rope_rows(COS, SIN, pos, D: tl.constexpr):
    """cos / sin of both halves of a head at `pos` (whole tables, sin sign-folded, as `fused` reads them)."""
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + pos * D + half).to(tl.float32)
    c2 = tl.load(COS + pos * D + D // 2 + half).to(tl.float32)
    s1 = tl.load(SIN + pos * D + half).to(tl.float32)
    s2 = tl.load(SIN + pos * D + D // 2 + half).to(tl.float32)
    return c1, c2, s1, s2


@triton.jit
def _rope_qkv(row, heads, gmask, kvh, c1, c2, s1, s2, dtype: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
              H: tl.constexpr, KV: tl.constexpr):  # fmt: skip
    """From one token's qkv row: this group's q [GP, D] and the KV head's k [D] rotated, v [D]; rounded to
    the cache dtype as `fused.rope_write_cache` rounds what it stores (so the results are the same bits)."""
    half = tl.arange(0, D // 2)
    qa = tl.load(row + heads[:, None] * D + half[None, :], mask=gmask[:, None], other=0.0).to(tl.float32)
    qb = tl.load(row + heads[:, None] * D + D // 2 + half[None, :], mask=gmask[:, None], other=0.0)
    qb = qb.to(tl.float32)
    q1 = qa * c1[None, :] + qb * s1[None, :]
    q2 = qb * c2[None, :] + qa * s2[None, :]
    q = tl.reshape(tl.permute(tl.join(q1.to(dtype), q2.to(dtype)), (0, 2, 1)), [GP, D])
    ka = tl.load(row + (H + kvh) * D + half).to(tl.float32)
    kb = tl.load(row + (H + kvh) * D + D // 2 + half).to(tl.float32)
    k1 = ka * c1 + kb * s1
    k2 = kb * c2 + ka * s2
    k = tl.reshape(tl.permute(tl.join(k1.to(dtype), k2.to(dtype)), (1, 0)), [D])
    v = tl.load(row + (H + KV + kvh) * D + tl.arange(0, D)).to(dtype)
    return q, k, v


@triton.jit
def _paged_decode_kernel(
    Q,
    K,
    V,
    BT,
    CTX,
    Out,
    ML,
    ACC,
    CNT,
    COS,
    SIN,
    POS,
    SLOT,
    scale,
    min_split_tokens,
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
    SPLIT: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
    ROPE_IN: tl.constexpr = False,
    H: tl.constexpr = 1,
    KV: tl.constexpr = 1,
):
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # Before the wait (programmatic dependent launch): the context length and block table (sent before the
    # graph ran) and the first tile of this split's keys and values except this step's own token, which the
    # kernel just before writes; it is read after the wait and patched in.
    ctx = tl.load(CTX + b)
    last = ctx - 1
    if SPLIT:
        # This sequence's splits: as many as its context fills with min_split_tokens each (at most the
        # grid's), each a multiple of TILE long; the programs past them have nothing to do.
        n_want = tl.maximum(tl.minimum(tl.num_programs(2), tl.cdiv(ctx, min_split_tokens)), 1)
        chunk = tl.maximum(tl.cdiv(tl.cdiv(ctx, n_want), TILE), 1) * TILE
        n_active = tl.maximum(tl.cdiv(ctx, chunk), 1)
        if split >= n_active:
            return
        lo = split * chunk
        hi = tl.minimum(ctx, lo + chunk)
    else:
        n_active = 1
        lo = 0
        hi = ctx
    offs_d = tl.arange(0, D)
    offs_t = tl.arange(0, TILE)
    bt_row = BT + b * stride_btb
    tok = lo + offs_t
    blk = tl.load(bt_row + tok // BS, mask=tok < hi, other=0)
    base = blk[:, None] * stride_kb + (tok % BS)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
    old = (tok < last)[:, None]
    k = tl.load(K + base, mask=old, other=0.0)
    v = tl.load(V + base, mask=old, other=0.0)
    # The next tile's block-table entries, so that each tile in the loop costs one round trip, not two.
    if PREFETCH:  # noqa: SIM108 (a constexpr branch, compiled out)
        nblk = tl.load(bt_row + (tok + TILE) // BS, mask=tok + TILE < hi, other=0)
    else:
        nblk = blk
    if ROPE_IN:  # this step's position, slot and cos / sin rows (host-sent: read before the wait)
        pos = tl.load(POS + b)
        slot = tl.load(SLOT + b)
        c1, c2, s1, s2 = _rope_rows(COS, SIN, pos, D)
    else:
        lblk = tl.load(bt_row + last // BS)
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    offs_g = tl.arange(0, GP)
    gmask = offs_g < G
    heads = kvh * G + offs_g
    if not ROPE_IN:
        q = tl.load(
            Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=gmask[:, None], other=0.0
        )
    is_last = (tok == last)[:, None]
    if ROPE_IN:  # q and this token's k rotated here, k and v written into the cache by the last split
        q, k_new, v_new = _rope_qkv(Q + b * stride_qb, heads, gmask, kvh, c1, c2, s1, s2, K.dtype.element_ty,
                                    GP, D, H, KV)  # fmt: skip
        if split == n_active - 1:
            dst = (slot // BS) * stride_kb + (slot % BS) * stride_ks + kvh * stride_kh + offs_d
            tl.store(K + dst, k_new)
            tl.store(V + dst, v_new)
        k = tl.where(is_last, k_new[None, :], k)
        v = tl.where(is_last, v_new[None, :], v)
    else:
        lbase = lblk * stride_kb + (last % BS) * stride_ks + kvh * stride_kh + offs_d
        k = tl.where(is_last, tl.load(K + lbase)[None, :], k)
        v = tl.where(is_last, tl.load(V + lbase)[None, :], v)
    m = tl.full([GP], float("-inf"), tl.float32)
    l_sum = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    for start in range(lo, hi, TILE):
        t = start + offs_t
        tmask = t < hi
        if start > lo:
            if PREFETCH:  # noqa: SIM108 (a constexpr branch, compiled out)
                blk = nblk
            else:
                blk = tl.load(bt_row + t // BS, mask=tmask, other=0)
            base = (
                blk[:, None] * stride_kb + (t % BS)[:, None] * stride_ks + kvh * stride_kh + offs_d[None, :]
            )
            k = tl.load(K + base, mask=tmask[:, None], other=0.0)
            v = tl.load(V + base, mask=tmask[:, None], other=0.0)
            if PREFETCH:
                nblk = tl.load(bt_row + (t + TILE) // BS, mask=t + TILE < hi, other=0)
        m, l_sum, acc = _attend(q, k, v, tmask, m, l_sum, acc, scale)
    out_ptrs = Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
    if n_active > 1:
        # Several splits: write this one's partial, count it in; the program that arrives last merges them
        # and puts the counter back to zero for the next call (or CUDA-graph replay).
        group = b * tl.num_programs(1) + kvh
        first = group * tl.num_programs(2)
        row = first + split
        tl.store(ML + (row * 2) * GP + offs_g, m, mask=gmask)
        tl.store(ML + (row * 2 + 1) * GP + offs_g, l_sum, mask=gmask)
        tl.store(ACC + (row * GP + offs_g[:, None]) * D + offs_d[None, :], acc, mask=gmask[:, None])
        tl.debug_barrier()  # every thread's partial is written before the counter's release
        done = tl.atomic_add(CNT + group, 1, sem="acq_rel", scope="gpu")
        if done == n_active - 1:
            out = _combine(ML, ACC, first, n_active, offs_g, gmask, offs_d, GP, D)
            tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=gmask[:, None])
            tl.store(CNT + group, 0)
    else:
        out = acc / l_sum[:, None]
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=gmask[:, None])


# Keys per loop iteration, warps and software pipelining by batch size. At batch <= 4 the kernel runs a few
# programs, so its time is the latency of its sequential tiles: one large tile (bench_decode.py b1ab, run 4:
# 256 keys / 8 warps 1,041 tok/s, 128 / 4 1,029, 64 / 4 997). At larger batches there are programs enough to
# fill the GPU; 64 keys measured best (b64ab, run 5); keeping the next tile's loads in flight while computing
# this one measured no faster (run 6) and was removed.
TILE = {"small_batch": 256, "large_batch": 64}
WARPS = {"small_batch": 8, "large_batch": 4}
# Split-KV (flash-decoding): at batch 1 the grid is one program per KV head (8 of the H100's 132 SMs), so a
# long context is read at a few percent of bandwidth. The grid gets S programs per (sequence, KV head), S
# from the batch so the grid covers about two waves of SMs; each sequence uses as many of them as its
# context fills with MIN_SPLIT_TOKENS each, so short contexts keep one program and the direct path.
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 256
# Load the next tile's block-table entries one iteration ahead (one dependent round trip per tile, not two).
PREFETCH_TABLE = True
_SMS_OFF_GPU = 132  # the interpreter has no SMs: split as on an H100 so it runs the same paths
_SMS: dict[torch.device, int] = {}
_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def num_splits(batch: int, kv_heads: int, device: torch.device) -> int:
    """Programs per (sequence, KV head) in the grid, fixed at launch (and so at CUDA-graph capture)."""
    if device not in _SMS:
        cuda = device.type == "cuda"
        _SMS[device] = (
            torch.cuda.get_device_properties(device).multi_processor_count if cuda else _SMS_OFF_GPU
        )
    wanted = -(-2 * _SMS[device] // (batch * kv_heads))
    return max(1, min(MAX_SPLITS, wanted))


def _scratch(device: torch.device, b: int, kv: int, s: int, gp: int, d: int) -> tuple[torch.Tensor, ...]:
    """Partials (max and sum, unnormalised output; fp32) and per-(sequence, KV head) arrival counters, one
    set per launch shape, kept for the process. The counters are zeroed here once and put back to zero by
    the merging program, so every later call (or graph replay) starts from zero. Allocated on first use,
    which must not be inside CUDA-graph capture (the zeroing would only run at replay): the engine's runner
    calls each batch bucket eagerly before capturing it."""
    key = (device, b, kv, s, gp, d)
    if key not in _SCRATCH:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"paged_decode_attention: no split-KV scratch for batch {b} yet; call it once outside "
                "CUDA-graph capture for this batch size before capturing (a warm-up call)"
            )
        nan, f32 = float("nan"), torch.float32
        _SCRATCH[key] = (  # NaN until written: a partial merged before it was written cannot pass the check
            torch.full((b * kv * s * 2 * gp,), nan, device=device, dtype=f32),
            torch.full((b * kv * s * gp * d,), nan, device=device, dtype=f32),
            torch.zeros(b * kv, device=device, dtype=torch.int32),
        )
    return _SCRATCH[key]


def _launch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    heads: int,
    rope: tuple[torch.Tensor, ...] | None = None,
) -> torch.Tensor:
    """Launch the kernel on q [B, heads, d], or with `rope` (cos, sin, positions, slots) on the step's
    un-rotated qkv rows [B, (heads + 2 kv_heads) d]; returns the attention output [B, heads, d]."""
    b, d = q.shape[0], k_cache.shape[-1]
    kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    gp = max(16, triton.next_power_of_2(group))
    q = q.contiguous()
    out = torch.empty(b, heads, d, dtype=q.dtype, device=q.device)
    small = "small_batch" if b <= 4 else "large_batch"
    # No more splits than the table's capacity can fill (a 1,024-token engine: 4 at most), so a short context
    # does not launch programs that exit at once (F2: 128 programs for 8 cost 0.8 us a call).
    capacity = -(-block_tables.shape[1] * block_size // MIN_SPLIT_TOKENS)
    splits = max(1, min(num_splits(b, kv_heads, q.device), capacity))
    ml, acc, cnt = _scratch(q.device, b, kv_heads, splits, gp, d) if splits > 1 else (out, out, context_lens)
    cos, sin, pos, slots = rope if rope is not None else (out, out, context_lens, context_lens)
    _paged_decode_kernel[(b, kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, ml, acc, cnt, cos, sin, pos, slots, scale,
        MIN_SPLIT_TOKENS, q.stride(0), d if rope is not None else q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), block_tables.stride(0), out.stride(0), out.stride(1), G=group,
        GP=gp, D=d, BS=block_size, TILE=TILE[small], SPLIT=splits > 1, PREFETCH=PREFETCH_TABLE,
        PDL=fused.pdl_on(), ROPE_IN=rope is not None, H=heads, KV=kv_heads, num_warps=WARPS[small],
        **fused.launch_options(),
    )  # fmt: skip
    return out


@torch.library.custom_op("inferforge::paged_decode_attention", mutates_args=())
def _paged_decode_op(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    return _launch(q, k_cache, v_cache, block_tables, context_lens, scale, q.shape[1])


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


@torch.library.custom_op("inferforge::paged_decode_attention_rope", mutates_args=("k_cache", "v_cache"))
def _paged_decode_rope_op(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    heads: int,
) -> torch.Tensor:
    rope = (cos, sin, positions, slots)
    return _launch(qkv, k_cache, v_cache, block_tables, context_lens, scale, heads, rope)


@_paged_decode_rope_op.register_fake
def _(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables, context_lens, scale, heads):
    return qkv.new_empty(qkv.shape[0], heads, k_cache.shape[-1])


def paged_decode_attention_rope(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    heads: int,
) -> torch.Tensor:
    """`fused.rope_write_cache` and `paged_decode_attention` in one kernel, for decode steps of several
    sequences (one sequence has them in `gemv`'s q/k/v epilogue): qkv [B, (heads + 2 kv_heads) d] as the
    q/k/v product left it; each program rotates its group's q and its KV head's new k, the last split writes k
    and v into the cache, and the new token is attended from registers. A layer of a batch-64 step is a
    kernel and its gap shorter (F4: the RoPE kernel took 60 us of a 1.54 ms step)."""
    return _paged_decode_rope_op(qkv, cos, sin, positions, slots, k_cache, v_cache, block_tables,
                                 context_lens, float(scale), heads)  # fmt: skip


CHECK_CONTEXTS = (1, 17, 64, 100, 192, 300, 777, 1024)


def check_against_reference(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, contexts: tuple[int, ...] = CHECK_CONTEXTS
) -> float:
    """Max abs difference to the torch reference on random paged data (ragged lengths, shuffled blocks).

    The default lengths run every path at the default knobs on a GPU: one program per (sequence, KV head)
    for the short ones, several splits merged for 300 tokens and more; it is run twice, so a counter that
    was not put back to zero shows as a wrong second answer."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    b, heads, kv_heads, d, bs = len(contexts), 32, 8, 64, 16
    max_blocks = -(-max(contexts) // bs)
    n_blocks = b * max_blocks + 1
    k = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    v = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    q = torch.randn(b, heads, d, generator=gen).to(device, dtype)
    bt = torch.randperm(n_blocks - 1, generator=gen).add(1).view(b, max_blocks).to(device)
    ctx = torch.tensor(contexts, device=device)
    ref = attention.decode_attention_torch(q, k, v, bt, ctx, d**-0.5).float()
    return max(
        (ref - paged_decode_attention(q, k, v, bt, ctx, d**-0.5).float()).abs().max().item() for _ in "ab"
    )


def check_rope_against_reference(
    device: torch.device, dtype: torch.dtype = torch.bfloat16, contexts: tuple[int, ...] = CHECK_CONTEXTS
) -> float:
    """`paged_decode_attention_rope` against `fused.rope_write_cache` + `paged_decode_attention` on random
    data: the largest difference of the outputs and of the caches (each step's new k and v), twice."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    b, heads, kv_heads, d, bs = len(contexts), 32, 8, 64, 16
    max_blocks = -(-max(contexts) // bs)
    n_blocks = b * max_blocks + 1
    k = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    v = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(device, dtype)
    bt = torch.randperm(n_blocks - 1, generator=gen).add(1).view(b, max_blocks)
    pos = torch.tensor(contexts) - 1
    slots = (bt[torch.arange(b), pos // bs] * bs + pos % bs).to(device)
    bt, pos, ctx = bt.to(device), pos.to(device), (pos + 1).to(device)
    angles = torch.outer(
        torch.arange(max(contexts), dtype=torch.float32), 10000.0 ** -(torch.arange(d // 2) / (d // 2))
    )
    cos = torch.cat((angles, angles), -1).cos().to(device, dtype)
    sin = torch.cat((-angles.sin(), angles.sin()), -1).to(device, dtype)
    worst = 0.0
    for _ in "ab":
        qkv = torch.randn(b, (heads + 2 * kv_heads) * d, generator=gen).to(device, dtype)
        k_ref, v_ref = k.clone(), v.clone()
        q, _, _ = fused.rope_write_cache(
            qkv, cos, sin, pos, slots, k_ref, v_ref, heads, kv_heads, True, False
        )
        ref = paged_decode_attention(q, k_ref, v_ref, bt, ctx, d**-0.5).float()
        got = paged_decode_attention_rope(qkv, cos, sin, pos, slots, k, v, bt, ctx, d**-0.5, heads).float()
        caches = max((k - k_ref).abs().max().item(), (v - v_ref).abs().max().item())
        worst = max(worst, (ref - got).abs().max().item(), caches)
    return worst


def verified_rope_kernel(device: torch.device, tolerance: float = 2e-2):  # -> Callable | None
    """`paged_decode_attention_rope` if it matches RoPE + cache writes + attention on this device, else None
    (the engine keeps the two kernels)."""
    return paged_decode_attention_rope if check_rope_against_reference(device) <= tolerance else None


def verified_kernel(device: torch.device, tolerance: float = 2e-2):  # -> DecodeFn | None
    """The kernel if it matches the reference on this device, else None (the engine keeps the torch path)."""
    return paged_decode_attention if check_against_reference(device) <= tolerance else None
