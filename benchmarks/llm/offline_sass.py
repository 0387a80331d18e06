"""`gemv`'s batch-1 int8 / bf16 kernels compiled for sm_90 on a machine with no GPU: registers, shared memory,
load widths, barriers and shuffles per product of the 1.2B shape, from Triton's own ptxas and cuobjdump.

    python benchmarks/llm/offline_sass.py --format int8 [--tiles 2048x8192=8,2048,4 ...] [--dump DIR]

What a device run cannot show cheaply: whether a tile change spills, how many registers it holds and whether
weight loads are 16 bytes wide. Against the H100's Nsight Compute (K1 of 2026-11-23): bf16 identical for all
five products (168, 160, 121, 194, 127 registers); int8 q/k/v and o identical (96, 64), gate/up, LM head and
down 72 / 72 / 157 here against 79 / 79 / 161 there (the device's ptxas). Pointer and stride arguments are
declared divisible by 16, as Triton's launcher specializes them on the device: without that, the compiler
emits one-byte loads (512 LDG.E.U8 a thread for int8's down product) and the register counts mean nothing.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from inferforge.llm import gemv

BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
# (N, K): q/k/v with its norm prologue and RoPE epilogue, o and down with the residual, gate/up with the norm
# and the SiLU pair, the LM head with the norm.
PRODUCTS = {
    "qkv": ((3072, 2048), 1, 2),
    "o": ((2048, 2048), 0, 1),
    "gate_up": ((16384, 2048), 1, 3),
    "down": ((2048, 8192), 0, 1),
    "lm_head": ((128256, 2048), 1, 0),
}
_POINTERS = ("X", "G", "W", "SCALE", "BIAS", "R", "Y", "COS", "SIN", "POS", "SLOT", "KC", "VC")


def _signature(weight: str) -> dict[str, str]:
    sig = {name: "*bf16" for name in _POINTERS}
    sig.update(W=weight, POS="*i64", SLOT="*i64", N="i32", stride_wn="i32", eps="fp32", stride_c_slot="i32",
               PART="*fp32", CNT="*i32")  # fmt: skip
    return sig


def _cuobjdump(flag: str, path: str) -> str:
    return subprocess.run([BIN / "cuobjdump", flag, path], capture_output=True, text=True, check=True).stdout


def compile_product(name: str, fmt: str, tiles: gemv.TileConfig | None, split: int = 1) -> dict:
    (n, k), prologue, epilogue = PRODUCTS[name]
    int8 = fmt == "int8"
    cfg = tiles or gemv.tiles_for(n, k, 1 if int8 else 2, int8=int8)
    if prologue and cfg.block_k < k:  # as `gemv.gemv`: the norm needs the whole row in one tile
        cfg = gemv.TileConfig(max(2, 32768 // (k * (1 if int8 else 2))), k, cfg.num_warps)
    if epilogue == 2:
        cfg = gemv.TileConfig(min(cfg.block_n, 64), cfg.block_k, cfg.num_warps)
    consts = dict(
        K=k, PROLOGUE=prologue, EPILOGUE=epilogue, HAS_SCALE=int8, HAS_BIAS=False, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, W_MODE=gemv.INT8_MODE["mode"] if int8 else 0,
        PAIR_GAP=32 if epilogue == 2 else n // 2, H=32, KV=8, D=64, PDL=1, PRE=False,
        EARLY=gemv.EARLY_NEXT_TILE["int8" if int8 else "bf16"], EARLY_RES=True,
        SPLIT=split if name in ("down", "o") and (k // cfg.block_k) % split == 0 else 1, PF_RANGES=0,
    )  # fmt: skip
    sig = {**_signature("*i8" if int8 else "*bf16"), **dict.fromkeys(consts, "constexpr")}
    sig.update(PF0="i64", PF0_END="i64", PF1="i64", PF1_END="i64", PF_CHUNK="i32")  # `prefetch`, unused
    return _compile(gemv._gemv_kernel, sig, consts, cfg, name, consts["SPLIT"])


def compile_int4(name: str, tiles: gemv.TileConfig | None) -> dict:
    """The int4 kernel (`gemv_int4`, gemlite's bytes in place), group 64 with the fma zeros, as `quant.py`
    makes them."""
    from inferforge.llm import gemv_int4

    (n, k), prologue, epilogue = PRODUCTS[name]
    cfg = tiles or gemv_int4.default_tiles(n, k)
    if prologue and cfg.block_k < k:
        cfg = gemv.TileConfig(cfg.block_n, k, cfg.num_warps)
    if epilogue == 2:
        cfg = gemv.TileConfig(min(cfg.block_n, 64), cfg.block_k, cfg.num_warps)
    consts = dict(
        K=k, GROUP=64, FMA=True, PROLOGUE=prologue, EPILOGUE=epilogue, HAS_BIAS=False, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, TG=max(cfg.block_k // 64, 1), PAIR_GAP=32 if epilogue == 2 else n // 2, H=32,
        KV=8, D=64, PDL=1, PTX=True, EARLY_RES=True,
    )  # fmt: skip
    fn = gemv_int4._gemv_int4_kernel
    ptrs = ("X", "G", "W", "S", "Z", "BIAS", "R", "Y", "COS", "SIN", "POS", "SLOT", "KC", "VC")
    sig = {a: "*bf16" for a in ptrs}
    sig.update(W="*i32", POS="*i64", SLOT="*i64", N="i32", stride_w="i32", stride_s="i32", stride_z="i32",
               eps="fp32", stride_c_slot="i32", **dict.fromkeys(consts, "constexpr"))  # fmt: skip
    return _compile(fn, sig, consts, cfg, name, 1)


def _compile(fn, sig: dict, consts: dict, cfg: gemv.TileConfig, name: str, split: int) -> dict:
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a, t in sig.items()
             if t.startswith("*") or a.startswith("stride") or a == "N"}  # fmt: skip
    kernel = triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options={"num_warps": cfg.num_warps},
    )
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    usage = _cuobjdump("--dump-resource-usage", f.name)
    sass = _cuobjdump("--dump-sass", f.name)
    os.unlink(f.name)
    regs = re.search(r"REG:(\d+) STACK:(\d+)", usage)
    loads: dict[str, int] = {}
    for op in re.findall(r"\b(LDG[A-Z0-9._]*)", sass):
        loads[op] = loads.get(op, 0) + 1
    return {
        "product": name, "tiles": (cfg.block_n, cfg.block_k, cfg.num_warps), "split": split,
        "registers": int(regs[1]), "stack": int(regs[2]), "shared": kernel.metadata.shared, "loads": loads,
        "barriers": len(re.findall(r"\bBAR\.", sass)), "shuffles": len(re.findall(r"\bSHFL\.", sass)),
        "instructions": len(re.findall(r"^\s+/\*[0-9a-f]{4}\*/", sass, re.M)), "sass": sass,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--format", choices=["int8", "bf16", "int4"], default="int8")
    ap.add_argument("--tiles", nargs="*", default=[], help="NxK=block_n,block_k,warps overrides")
    ap.add_argument("--dump", help="a folder for each product's SASS")
    ap.add_argument("--split", type=int, default=1, help="split-K programs per row block (`gemv.SPLIT_K`)")
    a = ap.parse_args()
    for spec in a.tiles:
        shape, cfg = spec.split("=")
        n, k = (int(v) for v in shape.split("x"))
        elem = 1 if a.format != "bf16" else 2
        gemv.TUNED[(n, k, elem)] = gemv.TileConfig(*(int(v) for v in cfg.split(",")))
    for name in PRODUCTS:
        (n, k), _, _ = PRODUCTS[name]
        if a.format.startswith("int4"):
            r = compile_int4(name, gemv.TUNED.get((n, k, 1)))
        else:
            r = compile_product(
                name, a.format, gemv.TUNED.get((n, k, 1 if a.format == "int8" else 2)), a.split
            )
        if a.dump:
            Path(a.dump).mkdir(parents=True, exist_ok=True)
            (Path(a.dump) / f"{a.format}_{name}.sass").write_text(r.pop("sass"))
        else:
            r.pop("sass")
        print(r)


if __name__ == "__main__":
    main()
