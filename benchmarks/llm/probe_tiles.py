"""Run N10 of 2026-11-23: which of N7's tiles computed wrong results, each against the Triton int4 GEMV on
random weights in gemlite's layout (groups of 64 and 128, three shapes), with a library built with the extra
tiles (`IF_CASE(4, 16, 4) IF_CASE(8, 8, 4) IF_CASE(4, 16, 0) IF_CASE(8, 8, 0)` added to a copy of the .cu,
passed by `INFERFORGE_INT4_TC_LIB`). Found: every MT 8 tile wrong (`lds_words` read 1 of its 8 words; it now
refuses to build), (4, 16) right. Today a library with MT 8 tiles fails to build."""

import torch

from inferforge.llm import cuda_int4, gemv_int4

cuda_int4.CONFIGS.extend([(4, 16, 4), (8, 8, 4), (4, 16), (8, 8)])
torch.manual_seed(0)
for group in (64, 128):
    for n, k in ((4096, 2048), (16384, 2048), (4096, 4096)):
        packed = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        scales = (torch.rand(k // group, n, device="cuda") * 0.01 + 1e-3).to(torch.bfloat16)
        zeros = (-8 * scales.float()).to(torch.bfloat16)
        w = gemv_int4.Int4Weight(packed, scales, zeros, group, True)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = gemv_int4.gemv_int4(x, w).float()
        for tiles in [(4, 8, 4), (4, 16, 4), (8, 8, 4), (4, 16), (8, 8)]:
            try:
                got = cuda_int4.gemv_int4_tc(x, w, tiles=tiles).float()
                torch.cuda.synchronize()
                err = ((got - want).abs().max() / want.abs().max()).item()
                bad = ((got - want).abs() > 0.05 * want.abs().max()).nonzero()[:, 1]
                where = f"bad cols {bad.numel()}: first {bad[:6].tolist()}" if bad.numel() else ""
                print(f"g{group} {n}x{k} {tiles}: rel err {err:.2e} {where}", flush=True)
            except Exception as e:
                print(f"g{group} {n}x{k} {tiles}: {type(e).__name__}: {e}", flush=True)
