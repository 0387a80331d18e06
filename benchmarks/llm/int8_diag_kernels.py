"""Diagnostic int8 GEMV kernels for bench_int8_diag.py: what bounds an int8 batch-1 product on the H100."""

from __future__ import annotations

import triton
import triton.language as tl

from inferforge.llm.gemv import _weights_f16, _weights_f32


@triton.jit
def diag_kernel(X, W, Y, K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, OP: tl.constexpr):
    """One program per BLOCK_N rows, K in BLOCK_K chunks, the next chunk loaded before the current one is
    reduced (as gemv). OP 0: integer sum of the raw bytes (no conversion, no float work); 3 / 6: gemv's
    int8 modes (fp32 FMAs); 10: weights made fp16 by bits, then a tensor-core dot with x broadcast to 16
    columns."""
    pid = tl.program_id(0)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows = W + offs_n[:, None].to(tl.int64) * K
    w = tl.load(rows + offs_k[None, :])
    if OP == 10:
        acc2 = tl.zeros([BLOCK_N, 16], tl.float32)
    elif OP == 0:
        acci = tl.zeros([BLOCK_N], tl.int32)
    else:
        acc = tl.zeros([BLOCK_N], tl.float32)
    for i in tl.static_range(0, K // BLOCK_K):
        kk = i * BLOCK_K + offs_k
        if OP == 0:
            acci += tl.sum(w.to(tl.int32), 1)
        elif OP == 10:
            xh = tl.load(X + kk).to(tl.float16)
            xb = tl.broadcast_to(xh[:, None], [BLOCK_K, 16])
            acc2 = tl.dot(_weights_f16(w, 3), xb, acc2)
        else:
            xin = tl.load(X + kk).to(tl.float32)
            acc += tl.sum(_weights_f32(w, OP) * xin[None, :], 1)
        if i + 1 < K // BLOCK_K:
            w = tl.load(rows + (kk + BLOCK_K)[None, :])
    if OP == 0:
        tl.store(Y + offs_n, acci.to(tl.float32).to(Y.dtype.element_ty))
    elif OP == 10:
        col = tl.arange(0, 16)
        tl.store(Y + offs_n, tl.sum(tl.where(col[None, :] == 0, acc2, 0.0), 1).to(Y.dtype.element_ty))
    else:
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty))
