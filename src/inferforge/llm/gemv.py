"""Batch-1 decode GEMVs in Triton, with the layer's small work fused in and programmatic dependent launch.

At batch 1 a decode step is ~100 kernels of a few microseconds each: cuBLAS reads the large matrices near
bandwidth, but the small ones (q/k/v 12 MB, o 8 MB) are latency-bound (7.5 and 6.4 us where bandwidth allows
4.2 and 2.8; decode-kernels.md), and every kernel boundary in the graph is a gap in which no weight is read.
This kernel does three things cuBLAS cannot:

- the layer's small work runs inside the products: RMSNorm in the prologue of q/k/v, gate/up and the LM head;
  the residual add in the epilogue of o and down (each program adds its own rows); RoPE and both cache writes
  in the epilogue of q/k/v; SiLU(gate) x up in the epilogue of gate/up (a program owns matching gate and up
  rows). A layer is 4 products and the attention kernel, nothing else;
- each program loads its first weight tile (and the norm weight, scales, bias, cos/sin rows) *before*
  `griddepcontrol.wait`: launched with programmatic dependent launch (Hopper), the next kernel's weight reads
  start while the previous kernel finishes (weights never depend on the previous kernel; activations do);
- int8 and fp8 weights with a per-output-channel scale (gemlite's 8-bit layers, read in place).

One program owns `BLOCK_N` output rows and walks K in `BLOCK_K` tiles, the next tile's load issued before the
current tile's product. One activation row only (batch 1): larger batches keep cuBLAS / gemlite. The model
switches to it only after `gemv_check` compared it with its reference and with each decode layer's own
forward on the live device (`kernels.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from inferforge.llm import fused

PLAIN, NORM = 0, 1  # prologues
STORE, RESIDUAL, ROPE_CACHE, SILU_PAIR = 0, 1, 2, 3  # epilogues


@triton.jit
def _weights_f16(w, W_MODE: tl.constexpr):
    """A weight tile made fp16 before the wait (`PRE_CONVERT`): int8 (modes 1 and 3, by bits, exact) and fp8
    (exact in fp16), so that after the wait only fp16 -> fp32 and the product are left; other types as they
    are."""
    if W_MODE == 1:
        return (w.to(tl.uint16) + 25600).to(tl.float16, bitcast=True) - 1152.0
    elif W_MODE == 3:
        u = w.to(tl.uint8, bitcast=True) ^ 0x80
        return (u.to(tl.uint16) + 25600).to(tl.float16, bitcast=True) - 1152.0
    elif w.dtype.is_fp8():
        return w.to(tl.float16)
    else:
        return w


@triton.jit
def _weights_f32(w, W_MODE: tl.constexpr):
    """A weight tile in fp32: 0 float types (bf16, fp16, fp32, fp8) and int8 by conversion; 1 uint8 holding
    q + 128, rebuilt as fp16 by bits (0x6400 | u is 1024 + u, exact) so no int-to-float instruction runs;
    2 int8 through fp16; 3 int8 made q + 128 by flipping its sign bit, then as 1; 5 int8 made q + 128 the same
    way, then the fp32 2^23 + q + 128 by bits; 6 as 5 in PTX (a byte permute a weight, one xor for four)."""
    if W_MODE == 1 or W_MODE == 3:
        return _weights_f16(w, W_MODE).to(tl.float32)
    elif W_MODE == 2:
        return w.to(tl.float16).to(tl.float32)
    elif W_MODE == 5:  # int8: 0x4B000000 | (q + 128) is the fp32 2^23 + q + 128 (exact), no conversion
        u = (w.to(tl.uint8, bitcast=True) ^ 0x80).to(tl.uint32) | 0x4B000000
        return u.to(tl.float32, bitcast=True) - 8388736.0
    elif W_MODE == 6:  # the same in PTX, four weights a call: one xor for four, one prmt and one sub each
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t; xor.b32 t, $4, 0x80808080;"
            " prmt.b32 $0, t, 0x4B000000, 0x7440; prmt.b32 $1, t, 0x4B000000, 0x7441;"
            " prmt.b32 $2, t, 0x4B000000, 0x7442; prmt.b32 $3, t, 0x4B000000, 0x7443;"
            " sub.f32 $0, $0, 0f4B000080; sub.f32 $1, $1, 0f4B000080;"
            " sub.f32 $2, $2, 0f4B000080; sub.f32 $3, $3, 0f4B000080; }",
            "=r,=r,=r,=r,r",
            [w],
            dtype=tl.float32,
            is_pure=True,
            pack=4,
        )
    else:
        return w.to(tl.float32)


@triton.jit
def _rows(pid, BLOCK_N: tl.constexpr, EPILOGUE: tl.constexpr, PAIR_GAP: tl.constexpr, D: tl.constexpr):
    """This program's output rows (pairs for RoPE: rows j and j + D/2 of a head; for SiLU: gate row j and up
    row j + N/2), shared by `_gemv_kernel` and `gemv_int4`."""
    HALF: tl.constexpr = BLOCK_N // 2
    head = pid  # used by RoPE only
    if EPILOGUE == 2:  # rows j and j + D/2 of one head
        head = pid // (D // BLOCK_N)
        j0 = head * D + (pid % (D // BLOCK_N)) * HALF
    else:  # SiLU pairs: gate row j with up row j + N/2
        j0 = pid * HALF
    idx = tl.arange(0, BLOCK_N)
    if EPILOGUE == 2 or EPILOGUE == 3:  # the paired epilogues, ROPE_CACHE and SILU_PAIR
        offs_n = j0 + (idx // HALF) * PAIR_GAP + idx % HALF
    else:
        offs_n = pid * BLOCK_N + idx
    return offs_n, j0, head


@triton.jit
def _store_residual(acc, res, Y, offs_n, nmask, act_ty: tl.constexpr):
    """y + residual, y rounded to the activation type first as the unfused model rounds it."""
    tl.store(Y + offs_n, (acc.to(act_ty).to(tl.float32) + res).to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _store(acc, X, R, Y, offs_n, nmask, j0, N, EPILOGUE: tl.constexpr, HALF: tl.constexpr):
    """Epilogues other than RoPE: the residual add and SiLU x up rounded as the unfused model rounds them."""
    act_ty = X.dtype.element_ty
    if EPILOGUE == 1:
        res = tl.load(R + offs_n, mask=nmask, other=0.0).to(tl.float32)
        _store_residual(acc, res, Y, offs_n, nmask, act_ty)
    elif EPILOGUE == 3:
        gate, up = tl.split(tl.permute(tl.reshape(acc.to(act_ty).to(tl.float32), [2, HALF]), (1, 0)))
        act = (gate / (1.0 + tl.exp(-gate))).to(act_ty).to(tl.float32)
        out = j0 + tl.arange(0, HALF)
        tl.store(Y + out, (act * up).to(Y.dtype.element_ty), mask=out < N // 2)
    else:
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=nmask)


@triton.jit
def _rope_prefetch(pid, POS, SLOT, COS, SIN, BLOCK_N: tl.constexpr, D: tl.constexpr):
    """This program's columns j of its head, this step's cache slot and the cos / sin values of its rows
    (host-sent inputs, so a kernel reads them before its wait)."""
    HALF: tl.constexpr = BLOCK_N // 2
    j = (pid % (D // BLOCK_N)) * HALF + tl.arange(0, HALF)
    pos = tl.load(POS)
    slot = tl.load(SLOT)
    c1 = tl.load(COS + pos * D + j).to(tl.float32)
    c2 = tl.load(COS + pos * D + D // 2 + j).to(tl.float32)
    s1 = tl.load(SIN + pos * D + j).to(tl.float32)
    s2 = tl.load(SIN + pos * D + D // 2 + j).to(tl.float32)
    return j, slot, c1, c2, s1, s2


@triton.jit
def _wait_for_inputs(PDL: tl.constexpr):
    """With programmatic dependent launch, block until the previous kernel finished (see `fused.pdl_on`)."""
    if PDL > 0:
        tl.extra.cuda.gdc_wait()
    if PDL == 1:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def _split_sum(acc, PART, CNT, block, share, offs_n, nmask, N, SPLIT: tl.constexpr):
    """Split-K: this program's partial into its row of the scratch, then an arrival count per row block; the
    last to arrive gets the partials summed in order (the others get nothing to store) and puts the count
    back to zero for the next call or graph replay."""
    tl.store(PART + share * N + offs_n, acc, mask=nmask)
    tl.debug_barrier()  # every thread's partial is written before the count's release
    done = tl.atomic_add(CNT + block, 1, sem="acq_rel", scope="gpu")
    last = done == SPLIT - 1
    total = acc
    if last:  # the partials are read only after the count said they are all there (as `triton_attn`)
        total = tl.zeros_like(acc)
        for s in tl.static_range(0, SPLIT):  # loads bypass L1: other programs wrote them
            total += tl.load(PART + s * N + offs_n, mask=nmask, other=0.0, cache_modifier=".cg")
        tl.store(CNT + block, 0)
    return total, last


@triton.jit
def _gemv_kernel(X, G, W, SCALE, BIAS, R, Y, N, stride_wn, eps, COS, SIN, POS, SLOT, KC, VC, stride_c_slot,
                 PART, CNT, K: tl.constexpr, PROLOGUE: tl.constexpr, EPILOGUE: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, W_MODE: tl.constexpr, PAIR_GAP: tl.constexpr, H: tl.constexpr,
                 KV: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr, PRE: tl.constexpr,
                 EARLY: tl.constexpr, EARLY_RES: tl.constexpr, SPLIT: tl.constexpr = 1, PF0=0, PF0_END=0,
                 PF1=0, PF1_END=0, PF_CHUNK=0, PF_RANGES: tl.constexpr = 0):  # fmt: skip
    if PDL == 2:  # `fused.pdl_on`
        tl.extra.cuda.gdc_launch_dependents()
    pid = tl.program_id(0)
    share = pid % SPLIT  # split-K (`SPLIT_K`): this program's share of the K tiles
    pid = pid // SPLIT
    HALF: tl.constexpr = BLOCK_N // 2
    offs_n, j0, head = _rows(pid, BLOCK_N, EPILOGUE, PAIR_GAP, D)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K // SPLIT  # this program's tiles
    k0 = share * (TILES * BLOCK_K)
    rows = W + offs_n[:, None].to(tl.int64) * stride_wn + k0
    w = tl.load(rows + offs_k[None, :], mask=nmask[:, None] & (k0 + offs_k[None, :] < K), other=0.0)
    if PF_RANGES > 0:  # `prefetch`: later products' weights into L2 while DRAM would idle
        fused.l2_prefetch(PF0, PF0_END, PF_CHUNK, tl.program_id(0))
    if PF_RANGES > 1:
        fused.l2_prefetch(PF1, PF1_END, PF_CHUNK, tl.program_id(0))
    # Before the wait: everything no kernel of this step writes (weights, the norm's weight, scales, bias,
    # this step's position and slot and their cos / sin rows, sent before the graph ran).
    if PROLOGUE == 1:
        g = tl.load(G + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    if HAS_SCALE:
        scale = tl.load(SCALE + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(BIAS + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if EPILOGUE == 2:
        j, slot, c1, c2, s1, s2 = _rope_prefetch(pid, POS, SLOT, COS, SIN, BLOCK_N, D)
    if EPILOGUE == 1 and EARLY_RES:  # `RESIDUAL_BEFORE_WAIT` says why this may come before the wait
        res = tl.load(R + offs_n, mask=nmask, other=0.0).to(tl.float32)
    if PRE:  # the first tile's conversion overlaps the previous kernel too
        w = _weights_f16(w, W_MODE)
    _wait_for_inputs(PDL)  # everything below may read the previous kernel's output
    act_ty = X.dtype.element_ty
    if PROLOGUE == 1:  # RMSNorm over the whole row (the wrapper makes BLOCK_K >= K), transformers' rounding
        xf = tl.load(X + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
        inv = tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)
        xin = ((xf * inv).to(act_ty).to(tl.float32) * g).to(act_ty).to(tl.float32)
        if PRE:
            acc = tl.sum(w.to(tl.float32) * xin[None, :], 1)
        else:
            acc = tl.sum(_weights_f32(w, W_MODE) * xin[None, :], 1)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
        for i in tl.static_range(0, TILES):
            kk = i * BLOCK_K + offs_k  # from k0 (`rows` starts there)
            nk = kk + BLOCK_K
            if EARLY and i + 1 < TILES:  # the next tile's load goes out before this tile's product
                w_next = tl.load(rows + nk[None, :], mask=nmask[:, None] & (k0 + nk[None, :] < K), other=0.0)
            xin = tl.load(X + k0 + kk, mask=k0 + kk < K, other=0.0).to(tl.float32)
            if PRE and i == 0:
                acc += tl.sum(w.to(tl.float32) * xin[None, :], 1)
            else:
                acc += tl.sum(_weights_f32(w, W_MODE) * xin[None, :], 1)
            if EARLY and i + 1 < TILES:
                w = w_next
            elif not EARLY:
                w = tl.load(rows + nk[None, :], mask=nmask[:, None] & (k0 + nk[None, :] < K), other=0.0)
    if SPLIT > 1:
        acc, last = _split_sum(acc, PART, CNT, pid, share, offs_n, nmask, N, SPLIT)
        nmask = nmask & last  # only the last program of the row block stores
    if HAS_SCALE:
        acc = acc * scale
    if HAS_BIAS:
        acc = acc + bias
    if EPILOGUE == 2:
        _rope_cache_store(acc.to(act_ty).to(tl.float32), head, j, c1, c2, s1, s2, slot, Y, KC, VC,
                          stride_c_slot, HALF, H, KV, D)  # fmt: skip
    elif EPILOGUE == 1 and EARLY_RES:
        _store_residual(acc, res, Y, offs_n, nmask, act_ty)
    else:
        _store(acc, X, R, Y, offs_n, nmask, j0, N, EPILOGUE, HALF)


@triton.jit
def _rope_cache_store(acc, head, j, c1, c2, s1, s2, slot, Q_OUT, KC, VC, stride_c_slot, HALF: tl.constexpr,
                      H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr):  # fmt: skip
    """q/k rows rotated (sign-folded sin table, as `fused.rope_write_cache`), q stored [H, D], k and v
    written into their cache slot ([slots, KV, D] views)."""
    x1, x2 = tl.split(tl.permute(tl.reshape(acc, [2, HALF]), (1, 0)))
    if head < H + KV:
        y1 = x1 * c1 + x2 * s1
        y2 = x2 * c2 + x1 * s2
        if head < H:
            tl.store(Q_OUT + head * D + j, y1.to(Q_OUT.dtype.element_ty))
            tl.store(Q_OUT + head * D + D // 2 + j, y2.to(Q_OUT.dtype.element_ty))
        else:
            dst = KC + slot * stride_c_slot + (head - H) * D
            tl.store(dst + j, y1.to(KC.dtype.element_ty))
            tl.store(dst + D // 2 + j, y2.to(KC.dtype.element_ty))
    else:
        dst = VC + slot * stride_c_slot + (head - H - KV) * D
        tl.store(dst + j, x1.to(VC.dtype.element_ty))
        tl.store(dst + D // 2 + j, x2.to(VC.dtype.element_ty))


@dataclass(frozen=True)
class TileConfig:
    block_n: int
    block_k: int
    num_warps: int


@dataclass
class RopeCache:
    """What the q/k/v product's epilogue needs to rotate q and k and write k and v into the paged cache."""

    cos: torch.Tensor  # [max_len, D], whole tables (sin sign-folded, `DecoderLM.init_rope`)
    sin: torch.Tensor
    positions: torch.Tensor  # [1]
    slots: torch.Tensor  # [1]
    k_cache: torch.Tensor  # [blocks, block_size, kv_heads, D]
    v_cache: torch.Tensor
    heads: int
    kv_heads: int


# Tiles measured faster alone (bench_gemv.py) ran slower inside the decode step on the H100 (run 3 of
# 2026-11-23: 976 tok/s with them, 1,011 with the defaults, same run), so nothing is listed; keyed by
# (N, K, weight bytes per element).
TUNED: dict[tuple[int, int, int], TileConfig] = {}
# How int8 weights become fp32 (`_weights_f32`). 6 (PTX: 4.4 SASS instructions a weight where 3 takes 7.0)
# was no faster than 3 at the default tiles (F2 of 2026-11-23: 1,385 tok/s against 1,409), but with int8
# tiles of 8 rows (`INT8_TILE_BYTES`) the int8 batch-1 graph took 673 / 671 us against mode 3's 702 / 719 at
# its default tiles and 716 / 713 at 8 rows (H3 of 2026-11-23, in turn): 6 it is. The interpreter runs no
# PTX and takes 5 (the same arithmetic) for 6.
INT8_MODE = {"mode": 6}
# int8 weight tiles of 16 KB (8 rows of K = 2048; 8 x 2048 for down) instead of 32 KB: half the conversion
# work per program after its wait (see `INT8_MODE` for the measurement). fp8 gained nothing from them (H4: 657
# / 663 us against 653 / 661) and keeps `default_tiles`.
INT8_TILE_BYTES = 16384
# Rebuild a 1-byte weight tile as fp16 before `griddepcontrol.wait`, so the conversion overlaps the previous
# kernel. fp8: batch-1 graph 681 / 678 -> 651 / 651 us (G10, in turn), on. int8 (mode 3): 703 / 723 against
# 706 / 716 with it, no gain, off (selectable; in modes 5 and 6 `_weights_f16` leaves the tile int8, so it is
# made float after the wait, still exact).
PRE_CONVERT = {"fp8": True, "int8": False}
# int8 products of one K tile whose tile is made fp16 before `griddepcontrol.wait` (mode 3, as fp8's
# `PRE_CONVERT`), by product. Q10-Q11 of 2026-11-24: int8's o took more of the step than a bf16 o with twice
# its bytes (int8 step 650-652 us, 620-635 with o in bf16), while fp8's o, converted before its wait, showed
# no such cost (644 against 653 with o in bf16). Q12: o pre-converted 628 / 637 us against 645 / 651, in turn
# (bf16 958): on.
INT8_PRE = {"o": True, "qkv": False, "gate_up": False, "down": False}
# Products of several K tiles (down): issue the next tile's load before this tile's product instead of after
# it (sm_90 SASS read offline: each tile's loads went out only after the previous tile's last FMA). Batch-1
# graphs, off / on, twice in turn (H5 of 2026-11-23): int8 669 / 665 and 677 / 656 us, on; bf16 962 / 963 and
# 956 / 953, fp8 650 / 672 and 651 / 650, no gain, off. (int4, the same change in `gemv_int4`: 749 / 761 and
# 744 / 767, not kept.)
EARLY_NEXT_TILE = {"int8": True, "fp8": False, "bf16": False}
# (Down's other K tiles loaded before the wait as well lost or gained nothing: R1 and R4 of 2026-11-24, int8
# 1 tile 628 / 633 us, 2 tiles 625 / 623, 4 tiles 641 / 644; bf16 2 tiles 980 against 955. The code is at
# ecc6b52.)


# Read the residual (o's and down's) before `griddepcontrol.wait`. In the decode chain it is never the
# previous kernel's output: o adds the layer's input, written by the previous layer's down three kernels
# earlier; down adds o's output, two kernels earlier. A kernel passes its wait only after its predecessor
# completed, and a kernel is launched (PDL 1: `fused.pdl_on`) only after its predecessor passed its wait, so
# when o or down starts, the kernel that wrote its residual has completed. With PDL 2 (dependents launched at
# once) that chain breaks and the residual is read after the wait.
RESIDUAL_BEFORE_WAIT = {"on": True}


# Split-K across programs for the products of several K tiles (down: K = 8,192 in tiles of 2,048): each
# program takes 1/SPLIT of the row block's tiles and the last to finish sums the partials (`_split_sum`), so
# the product runs as SPLIT times as many short programs, the shape gate/up has. Why: Nsight Compute (K1 of
# 2026-11-23) read int8's down product at 49% of DRAM peak, ~2 programs an SM walking 4 tiles each, and
# gate/up's 2,048 one-tile programs at 67%; summing raw int8 bytes, down took 9.2 us for 16.8 MB against
# gate/up's 13.0 for 33.5 (H2). Measured in the decode step and lost (L1 of 2026-11-23, batch-1 graphs, twice
# in turn): int8 648 / 648 us at 1, 655 / 656 at 2, 674 / 671 at 4; bf16 965 / 955, 987 / 984, 1,003 / 1,014.
# 1 (off) for every format.
SPLIT_K = {"int8": 1, "fp8": 1, "bf16": 1}
# (device, N, split, row blocks) -> (partials [split, N] fp32, arrival counts per row block int32, zeroed
# once; the kernel puts them back to zero). Shared by the layers of a step: the decode chain finishes one
# product's kernel before the next same-shaped product starts (see `RESIDUAL_BEFORE_WAIT`).
_SPLIT_SCRATCH: dict[tuple[torch.device, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _weight_kind(weight: torch.Tensor) -> str:
    if weight.dtype in (torch.int8, torch.uint8):
        return "int8"
    return "fp8" if weight.element_size() == 1 else "bf16"


def _split_k(weight: torch.Tensor, cfg: TileConfig, k: int, plain: bool) -> int:
    """How many programs share a row block's K tiles: `SPLIT_K` where the product has no norm prologue, no
    RoPE or SiLU epilogue and its tiles divide evenly; else 1."""
    split = SPLIT_K.get(_weight_kind(weight), 1)
    tiles = triton.cdiv(k, cfg.block_k)
    return split if split > 1 and plain and tiles % split == 0 else 1


def _split_scratch(
    device: torch.device, n: int, split: int, blocks: int
) -> tuple[torch.Tensor, torch.Tensor]:
    key = (device, n, split, blocks)  # two products of one width may have different row blocks
    if key not in _SPLIT_SCRATCH:
        part = torch.empty(split, n, dtype=torch.float32, device=device)
        _SPLIT_SCRATCH[key] = (part, torch.zeros(blocks, dtype=torch.int32, device=device))
    return _SPLIT_SCRATCH[key]


def _early_next_tile(weight: torch.Tensor) -> bool:
    return EARLY_NEXT_TILE[_weight_kind(weight)]


def _prefetch_args(ranges: tuple[tuple[int, int], ...], programs: int, x: torch.Tensor) -> dict:
    """The kernel's L2 prefetch arguments: each range's bytes in equal chunks a program, a multiple of
    2 KB (so each thread's 128th is 16-byte aligned); none on devices without Hopper's bulk prefetch."""
    if len(ranges) > 2 or any(a % 16 or n <= 0 for a, n in ranges):
        raise ValueError(f"prefetch takes up to two 16-byte aligned ranges, got {ranges}")
    if not ranges or not x.is_cuda or torch.cuda.get_device_capability(x.device) < (9, 0):
        return {}
    chunk = max(triton.cdiv(n, programs) for _, n in ranges)
    chunk = triton.cdiv(chunk, 2048) * 2048
    out: dict = {"PF_CHUNK": chunk, "PF_RANGES": len(ranges)}
    for i, (start, n) in enumerate(ranges):
        out[f"PF{i}"], out[f"PF{i}_END"] = start, start + n
    return out


def _pre_convert(weight: torch.Tensor) -> bool:
    if weight.element_size() != 1:
        return False
    return PRE_CONVERT["fp8" if weight.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) else "int8"]


def _product(residual: bool, rope: bool, silu_pair: bool, one_tile: bool) -> str:
    """Which product of a layer a call is, by its epilogue and tiles (`INT8_PRE`'s keys; "" for others)."""
    if residual:
        return "o" if one_tile else "down"
    return "qkv" if rope else "gate_up" if silu_pair else ""


def _int8_mode(x: torch.Tensor) -> int:
    mode = INT8_MODE["mode"]
    return 5 if mode == 6 and not x.is_cuda else mode


def default_tiles(n: int, k: int, elem_bytes: int, tile_bytes: int = 32768) -> TileConfig:
    """About `tile_bytes` of weights per tile, the whole row when it fits (so the norm prologue can use
    it)."""
    block_k = min(triton.next_power_of_2(k), 2048 if elem_bytes >= 2 or tile_bytes < 32768 else 4096)
    block_n = max(2, min(64, tile_bytes // (block_k * elem_bytes)))
    return TileConfig(block_n, block_k, 4)


def tiles_for(n: int, k: int, elem_bytes: int, int8: bool = False) -> TileConfig:
    tuned = TUNED.get((n, k, elem_bytes))
    return tuned or default_tiles(n, k, elem_bytes, INT8_TILE_BYTES if int8 else 32768)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    rope_cache: RopeCache | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    tiles: TileConfig | None = None,
    prefetch: tuple[tuple[int, int], ...] = (),
) -> torch.Tensor:
    """y = rmsnorm(x) @ weight.T (* scale) (+ bias), then one epilogue, for one row x [1, K].

    `norm_weight`: RMSNorm x first. Epilogues: `residual` returns y + residual [1, N]; `rope_cache` (the
    q/k/v product) returns q [1, heads, D] rotated and writes k and v into the cache; `silu_pair` (the
    gate/up product, gate rows then up rows) returns SiLU(gate) x up [1, N/2]; otherwise y [1, N]. A uint8
    weight holds int8 values + 128 (`_weights_f32`). With programmatic dependent launch on, `residual` is read
    before the wait (`RESIDUAL_BEFORE_WAIT`): it must not be written by the kernel launched just before.
    `prefetch`: up to two device byte ranges (start address, length; 16-byte aligned) that the programs
    fetch into L2 before their wait, split evenly (sm_90 and later; ignored elsewhere).
    """
    n, k = weight.shape
    if x.shape[0] != 1:
        raise ValueError(f"gemv takes one row, got {x.shape[0]}")
    elem = weight.element_size()
    cfg = tiles or tiles_for(n, k, elem, int8=weight.dtype in (torch.int8, torch.uint8))
    if norm_weight is not None and cfg.block_k < k:
        cfg = TileConfig(max(2, 32768 // (triton.next_power_of_2(k) * elem)), triton.next_power_of_2(k), 4)
    epilogue = STORE if residual is None else RESIDUAL
    w_mode = 1 if weight.dtype == torch.uint8 else _int8_mode(x) if weight.dtype == torch.int8 else 0
    pre = _pre_convert(weight)
    product = _product(residual is not None, rope_cache is not None, silu_pair, k <= cfg.block_k)
    if weight.dtype == torch.int8 and INT8_PRE.get(product, False):
        w_mode, pre = 3, True  # the (first) K tile made fp16 before the wait, later ones after it
    cache_args: tuple = (x, x, x, x, x, x, 0)
    heads = kv_heads = d = gap = 1
    rc = rope_cache
    if rc is not None:
        epilogue, d, heads, kv_heads = ROPE_CACHE, rc.k_cache.shape[-1], rc.heads, rc.kv_heads
        if n != (heads + 2 * kv_heads) * d:
            raise ValueError(
                f"rope_cache needs N = (heads + 2 kv_heads) * D = {(heads + 2 * kv_heads) * d}, got {n}"
            )
        cfg, gap = TileConfig(min(cfg.block_n, d), cfg.block_k, cfg.num_warps), d // 2  # inside one head
        y = torch.empty(1, heads, d, dtype=x.dtype, device=x.device)
        kc, vc = rc.k_cache.view(-1, kv_heads, d), rc.v_cache.view(-1, kv_heads, d)
        cache_args = (rc.cos, rc.sin, rc.positions, rc.slots, kc, vc, kc.stride(0))
    elif silu_pair:
        if n % 2:
            raise ValueError(f"silu_pair needs gate and up rows of equal count, got N = {n}")
        epilogue, gap = SILU_PAIR, n // 2
        cfg = TileConfig(max(2, cfg.block_n), cfg.block_k, cfg.num_warps)
        y = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
    else:
        y = torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device)
    grid = triton.cdiv(n // 2, cfg.block_n // 2) if silu_pair else triton.cdiv(n, cfg.block_n)
    split = _split_k(weight, cfg, k, norm_weight is None and epilogue in (STORE, RESIDUAL))
    part, count = _split_scratch(x.device, n, split, grid) if split > 1 else (x, x)
    pf = _prefetch_args(prefetch, grid * split, x)
    _gemv_kernel[(grid * split,)](
        x, norm_weight if norm_weight is not None else x, weight, scale if scale is not None else x,
        bias if bias is not None else x, residual if residual is not None else x, y, n, weight.stride(0), eps,
        *cache_args, part, count, K=k, PROLOGUE=PLAIN if norm_weight is None else NORM, EPILOGUE=epilogue,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        W_MODE=w_mode, PAIR_GAP=gap, H=heads, KV=kv_heads, D=d, PDL=fused.pdl_on(),
        PRE=pre, EARLY=_early_next_tile(weight),
        EARLY_RES=RESIDUAL_BEFORE_WAIT["on"] and fused.pdl_on() != 2, SPLIT=split, **pf,
        num_warps=cfg.num_warps,
        **fused.launch_options(),
    )  # fmt: skip
    return y
