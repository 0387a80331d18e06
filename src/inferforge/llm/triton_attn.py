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
    EARLY: tl.constexpr = True,
):
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0 and not EARLY:  # `attention.late_tile`: any key may have been written by the kernel before
        tl.extra.cuda.gdc_wait()
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
    lblk = tl.load(bt_row + last // BS)
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
    is_last = (tok == last)[:, None]
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
# Triton's software-pipelining depth for the key loop (None: Triton's default, 3 on Hopper). At batch 64 it
# changes nothing (Q3 of 2026-11-24, bench_attn_b64.py: 11.0-11.1 us a layer at 1 to 4 stages, 192-token
# contexts); kept as the benchmark's knob.
STAGES: dict[str, int | None] = {"small_batch": None, "large_batch": None}
# Split-KV (flash-decoding): at batch 1 the grid is one program per KV head (8 of the H100's 132 SMs), so a
# long context is read at a few percent of bandwidth. The grid gets S programs per (sequence, KV head), S
# from the batch so the grid covers about two waves of SMs; each sequence uses as many of them as its
# context fills with MIN_SPLIT_TOKENS each, so short contexts keep one program and the direct path.
MAX_SPLITS = 16
MIN_SPLIT_TOKENS = 256
# Batches over 4 (their own tiles): grid waves and tokens per split. Two waves leave batch 64 x 8 KV heads
# unsplit (512 programs); more waves split its contexts of a few hundred tokens too (min_tokens 0: the
# small batches' MIN_SPLIT_TOKENS).
LARGE_BATCH_SPLIT = {"waves": 2, "min_tokens": 0}
# Load the next tile's block-table entries one iteration ahead (one dependent round trip per tile, not two).
PREFETCH_TABLE = True
_SMS_OFF_GPU = 132  # the interpreter has no SMs: split as on an H100 so it runs the same paths
_SMS: dict[torch.device, int] = {}
_SCRATCH: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def num_splits(batch: int, kv_heads: int, device: torch.device, waves: int = 2) -> int:
    """Programs per (sequence, KV head) in the grid, fixed at launch (and so at CUDA-graph capture)."""
    if device not in _SMS:
        cuda = device.type == "cuda"
        _SMS[device] = (
            torch.cuda.get_device_properties(device).multi_processor_count if cuda else _SMS_OFF_GPU
        )
    wanted = -(-waves * _SMS[device] // (batch * kv_heads))
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
    gp = max(16, triton.next_power_of_2(group))
    q = q.contiguous()
    out = torch.empty_like(q)
    small = "small_batch" if b <= 4 else "large_batch"
    # No more splits than the table's capacity can fill (a 1,024-token engine: 4 at most), so a short context
    # does not launch programs that exit at once (F2: 128 programs for 8 cost 0.8 us a call).
    waves, min_tokens = 2, MIN_SPLIT_TOKENS
    if small == "large_batch":
        waves, min_tokens = LARGE_BATCH_SPLIT["waves"], LARGE_BATCH_SPLIT["min_tokens"] or MIN_SPLIT_TOKENS
    capacity = -(-block_tables.shape[1] * block_size // min_tokens)
    splits = max(1, min(num_splits(b, kv_heads, q.device, waves), capacity))
    ml, acc, cnt = _scratch(q.device, b, kv_heads, splits, gp, d) if splits > 1 else (out, out, context_lens)
    _paged_decode_kernel[(b, kv_heads, splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        context_lens,
        out,
        ml,
        acc,
        cnt,
        scale,
        min_tokens,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        G=group,
        GP=gp,
        D=d,
        BS=block_size,
        TILE=TILE[small],
        SPLIT=splits > 1,
        PREFETCH=PREFETCH_TABLE,
        PDL=fused.pdl_on(),
        EARLY=attention.EARLY_TILE["on"],
        num_warps=WARPS[small],
        **({"num_stages": STAGES[small]} if STAGES[small] else {}),
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


def verified_kernel(device: torch.device, tolerance: float = 2e-2):  # -> DecodeFn | None
    """The kernel if it matches the reference on this device, else None (the engine keeps the torch path)."""
    return paged_decode_attention if check_against_reference(device) <= tolerance else None
