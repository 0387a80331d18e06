"""Fused Triton kernels for the small, memory-bound work around each layer's matrix products (CUDA only).

At batch 1 a decode step of the 1.2B model spent about 30 us per layer in ~17 tiny eager kernels (two
RMSNorms, RoPE, two cache writes, residual adds, SiLU x up; `torch.profiler` on the H100, docs/llm-runs.md)
beside 52 us of GEMVs: launch-bound work, not bandwidth. Three kernels replace them:

- `add_rmsnorm`: the residual add and the following RMSNorm in one pass (the sum is written back as the new
  residual), as transformers rounds them: the sum in the model dtype, the norm in fp32, the weight product
  in the model dtype.
- `rope_write_cache`: rotates q and k (RoPE, sign-folded sin table), writes k and v into the paged cache at
  their slots and returns q, one program per token and head.
- `silu_mul`: SiLU(gate) x up from the fused gate/up product.

Each has a torch reference here (`*_reference`) with the same contract; the engine switches the model to the
kernels only after `verify()` found them equal to the references on the live device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_LAUNCH = {"pdl": False, "early_trigger": False}  # early: 960 vs 1,040 tok/s (run 5)


def enable_pdl(on: bool) -> None:
    """Launch this package's Triton kernels with programmatic dependent launch (Hopper+): each kernel waits
    (`griddepcontrol.wait`) before reading what the previous kernel wrote, so the next one may start early;
    kernels that only read weights first (`gemv`) do that before the wait."""
    _LAUNCH["pdl"] = on


def pdl_on() -> int:
    """The kernels' PDL constexpr: 0 off; 1 let the next kernel launch once this one passed its wait; 2 at
    once (the next kernel may then prefetch its weights while this one still waits: all kernels of a chain
    wait for their predecessor to finish before reading its output, so correctness holds either way)."""
    if not _LAUNCH["pdl"]:
        return 0
    return 2 if _LAUNCH["early_trigger"] else 1


def launch_options() -> dict[str, bool]:
    return {"launch_pdl": True} if _LAUNCH["pdl"] else {}


@triton.jit
def l2_prefetch(START, END, CHUNK, pid):
    """This program's `CHUNK` bytes of [START, END) (addresses) fetched into L2, a 128th by each thread
    (Hopper's bulk prefetch: no registers, nothing waits for it; 16-byte aligned sizes and addresses)."""
    sub = CHUNK // 128
    at = START + pid.to(tl.int64) * CHUNK + tl.arange(0, 128).to(tl.int64) * sub
    size = tl.minimum(tl.maximum(END - at, 0), sub).to(tl.int32)
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0;"
        " @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r",
        [at, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


@triton.jit
def _add_rmsnorm_kernel(X, R, W, Y, stride_x, stride_r, stride_y, N, eps, HAS_RES: tl.constexpr,
                        BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)).to(
            X.dtype.element_ty
        )
        tl.store(R + row * stride_r + offs, x, mask=mask)
    xf = x.to(tl.float32)
    inv = tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    normed = (xf * inv).to(X.dtype.element_ty).to(tl.float32)
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + offs, (normed * w).to(Y.dtype.element_ty), mask=mask)


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rmsnorm(x + residual), x + residual); the sum is written into `residual` in place. Without a
    residual (the first layer), returns (rmsnorm(x), x)."""
    t, n = x.shape
    y = torch.empty_like(x)
    res = residual if residual is not None else x
    _add_rmsnorm_kernel[(t,)](
        x, res, weight, y, x.stride(0), res.stride(0), y.stride(0), n, eps,
        HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8,
    )  # fmt: skip
    return y, res


def add_rmsnorm_reference(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' LlamaRMSNorm after a residual add, in eager torch."""
    if residual is not None:
        residual.copy_(x + residual)
        x = residual
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * normed, x


@triton.jit
def _rope_cache_kernel(QKV, COS, SIN, POS, SLOT, Q_OUT, K_OUT, KC, VC, T, stride_qkv, stride_qo_t,
                       stride_qo_h, stride_ko_t, stride_ko_h, stride_c_slot, stride_c_h, H: tl.constexpr,
                       KV: tl.constexpr, D: tl.constexpr, ROPE: tl.constexpr, WRITE_K: tl.constexpr,
                       BT: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    """One program per block of BT tokens and one head (0..H-1 query heads, H..H+KV-1 key and value)."""
    if PDL == 2:
        tl.extra.cuda.gdc_launch_dependents()
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()
    t = tl.program_id(0) * BT + tl.arange(0, BT)
    tmask = (t < T)[:, None]
    h = tl.program_id(1)
    half = tl.arange(0, D // 2)[None, :]
    src = QKV + t[:, None] * stride_qkv + h * D
    x1 = tl.load(src + half, mask=tmask, other=0.0).to(tl.float32)
    x2 = tl.load(src + D // 2 + half, mask=tmask, other=0.0).to(tl.float32)
    if ROPE:
        pos = tl.load(POS + t, mask=t < T, other=0)[:, None]
        c1 = tl.load(COS + pos * D + half, mask=tmask, other=0.0).to(tl.float32)
        c2 = tl.load(COS + pos * D + D // 2 + half, mask=tmask, other=0.0).to(tl.float32)
        s1 = tl.load(SIN + pos * D + half, mask=tmask, other=0.0).to(tl.float32)
        s2 = tl.load(SIN + pos * D + D // 2 + half, mask=tmask, other=0.0).to(tl.float32)
        y1 = x1 * c1 + x2 * s1
        y2 = x2 * c2 + x1 * s2
    else:
        y1 = x1
        y2 = x2
    if h < H:
        dst = Q_OUT + t[:, None] * stride_qo_t + h * stride_qo_h
        tl.store(dst + half, y1.to(Q_OUT.dtype.element_ty), mask=tmask)
        tl.store(dst + D // 2 + half, y2.to(Q_OUT.dtype.element_ty), mask=tmask)
    else:
        slot = tl.load(SLOT + t, mask=t < T, other=0)[:, None]
        kvh = h - H
        kdst = KC + slot * stride_c_slot + kvh * stride_c_h
        tl.store(kdst + half, y1.to(KC.dtype.element_ty), mask=tmask)
        tl.store(kdst + D // 2 + half, y2.to(KC.dtype.element_ty), mask=tmask)
        if WRITE_K:
            kout = K_OUT + t[:, None] * stride_ko_t + kvh * stride_ko_h
            tl.store(kout + half, y1.to(K_OUT.dtype.element_ty), mask=tmask)
            tl.store(kout + D // 2 + half, y2.to(K_OUT.dtype.element_ty), mask=tmask)
        vsrc = QKV + t[:, None] * stride_qkv + (H + KV + kvh) * D
        vdst = VC + slot * stride_c_slot + kvh * stride_c_h
        tl.store(vdst + half, tl.load(vsrc + half, mask=tmask, other=0.0), mask=tmask)
        tl.store(vdst + D // 2 + half, tl.load(vsrc + D // 2 + half, mask=tmask, other=0.0), mask=tmask)


def rope_write_cache(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    heads: int,
    kv_heads: int,
    rope: bool,
    need_k: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """qkv: [T, (heads + 2 kv_heads) * d]; cos/sin: [max_len, d] whole tables (sin sign-folded); caches
    [blocks, block_size, kv_heads, d]. Returns q [T, heads, d] rotated, k [T, kv_heads, d] rotated when
    `need_k` (prefill reads it; decode reads the cache), and v as a view of qkv."""
    t = qkv.shape[0]
    d = k_cache.shape[-1]
    q = torch.empty(t, heads, d, dtype=qkv.dtype, device=qkv.device)
    k = torch.empty(t, kv_heads, d, dtype=qkv.dtype, device=qkv.device) if need_k else q
    kc, vc = k_cache.view(-1, kv_heads, d), v_cache.view(-1, kv_heads, d)
    # One token per program at decode sizes; blocks of 32 for prompts (one program per token and head took
    # 0.39 ms per layer for 8,192 tokens on the H100, run E10).
    bt = 1 if t <= 64 else 32
    _rope_cache_kernel[(triton.cdiv(t, bt), heads + kv_heads)](
        qkv, cos, sin, positions, slots, q, k, kc, vc, t, qkv.stride(0), q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), kc.stride(0), kc.stride(1), H=heads, KV=kv_heads, D=d, ROPE=rope,
        WRITE_K=need_k, BT=bt, PDL=pdl_on(), num_warps=1 if bt == 1 else 4, **launch_options(),
    )  # fmt: skip
    v = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    return q, (k if need_k else None), v


@triton.jit
def _silu_mul_kernel(H, Y, stride_h, stride_y, WIDTH, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < WIDTH
    gate = tl.load(H + t * stride_h + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(H + t * stride_h + WIDTH + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(Y.dtype.element_ty).to(tl.float32)
    tl.store(Y + t * stride_y + offs, (act * up).to(Y.dtype.element_ty), mask=mask)


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h: [T, 2 I] (gate then up) -> SiLU(gate) * up, [T, I]."""
    t, width = h.shape
    i = width // 2
    y = torch.empty(t, i, dtype=h.dtype, device=h.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(i, block))](h, y, h.stride(0), y.stride(0), i, BLOCK=block, num_warps=4)
    return y


def check_against_reference(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, float]:
    """Largest difference of each kernel to its eager torch formula on random data (1.2B-like head shapes),
    relative to the largest magnitude of the reference (so one bf16 rounding step is about 4e-3)."""
    import torch.nn.functional as F

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-12)).item()

    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device, dtype)

    err: dict[str, float] = {}
    x, r, w = rand(5, 2048), rand(5, 2048), rand(2048)
    r_ref = r.clone()
    y, s = add_rmsnorm(x, r, w, 1e-5)
    y_ref, s_ref = add_rmsnorm_reference(x, r_ref, w, 1e-5)
    err["add_rmsnorm"] = max(rel(y, y_ref), rel(s, s_ref))
    heads, kv_heads, d, t = 32, 8, 64, 7
    qkv = rand(t, (heads + 2 * kv_heads) * d)
    cos, sin = rand(100, d), rand(100, d)
    pos = torch.tensor([0, 3, 9, 10, 50, 98, 99], device=device)
    slots = torch.tensor([17, 3, 40, 41, 5, 60, 2], device=device)
    kc, vc = rand(4, 16, kv_heads, d), rand(4, 16, kv_heads, d)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q, k, _ = rope_write_cache(qkv, cos, sin, pos, slots, kc, vc, heads, kv_heads, True, True)
    qk = qkv[:, : (heads + kv_heads) * d].view(t, heads + kv_heads, d).float()
    swapped = qk.unflatten(-1, (2, d // 2)).flip(-2).flatten(-2)
    qk_ref = qk * cos[pos].float().unsqueeze(1) + swapped * sin[pos].float().unsqueeze(1)
    kc_ref.view(-1, kv_heads, d)[slots] = qk_ref[:, heads:].to(dtype)
    vc_ref.view(-1, kv_heads, d)[slots] = qkv[:, (heads + kv_heads) * d :].view(t, kv_heads, d)
    assert k is not None
    err["rope_write_cache"] = max(
        rel(q, qk_ref[:, :heads]), rel(k, qk_ref[:, heads:]), rel(kc, kc_ref), rel(vc, vc_ref)
    )
    h = rand(3, 2 * 3000)
    gate, up = h.chunk(2, dim=-1)
    err["silu_mul"] = rel(silu_mul(h), F.silu(gate) * up)
    return err


def verified(device: torch.device, dtype: torch.dtype, tolerance: float = 3e-2) -> bool:
    """True when every kernel matches its eager formula on this device (within bf16 rounding)."""
    errors = check_against_reference(device, dtype)
    return all(e <= tolerance for e in errors.values())
