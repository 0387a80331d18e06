"""The tensor-core batch-1 int4 GEMV (`csrc/int4_gemv_tc.cu`), built with nvcc on first use and called
through ctypes: no torch extension build; the library links the CUDA runtime statically and takes raw
pointers and the current stream, so CUDA-graph capture and programmatic dependent launch work as for the
Triton kernels.

Why a CUDA kernel: Triton cannot place dequantized nibbles into `mma` operand registers, and the Triton int4
GEMV (`gemv_int4.py`) is bound by instruction issue (~7 SASS instructions a weight, Nsight run L2 of
2026-11-23). Here a nibble pair becomes an operand by one shift and one lop3 and the tensor cores multiply
and sum. It wins on the wide products (gate/up, the LM head) and loses on the narrow ones, whose time is
latency (run M2 in docs/llm-runs.md), so `choice` sends only the measured winners to it.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from inferforge.llm import fused
from inferforge.llm.gemv_int4 import Int4Weight

SOURCE = Path(__file__).parent / "csrc" / "int4_gemv_tc.cu"
# (rows a program / 16, warps a program) the library is built for.
CONFIGS = [(1, 8), (1, 16), (2, 8), (2, 16), (4, 4), (4, 8)]
STORE, RESIDUAL, SILU_PAIR = 0, 1, 3  # the kernel's epilogues
# Which products take this kernel, by (N, K): measured faster than `gemv_int4` inside CUDA graphs on the
# H100 (run M2, 16 weight copies, PDL): gate/up 16384 x 2048 10.0 against 11.4 us, LM head 128256 x 2048
# 61.9 against 78.5 us, both at 64 rows and 8 warps a program. q/k/v, o and down stay on Triton (3.9 / 3.0 /
# 8.2 against 3.1 / 2.3 / 7.7 us). Other shapes: products at least 8,192 rows wide, the same tiles.
TUNED: dict[tuple[int, int], tuple[int, int] | None] = {
    (3072, 2048): None,
    (2048, 2048): None,
    (2048, 8192): None,
    (16384, 2048): (4, 8),
    (128256, 2048): (4, 8),
}
STATE: dict = {"on": False, "error": None}
_LIB: dict[str, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """nvcc is missing or failed: the engine keeps the Triton kernel."""


def choice(n: int, k: int) -> tuple[int, int] | None:
    """(mt, warps) for a product of N x K, or None: keep `gemv_int4`."""
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    return (4, 8) if n >= 8192 and k <= 8 * 2048 else None


def library_path() -> Path:
    """Where the built library is cached: keyed by the source's digest and the compute capability."""
    root = os.environ.get("INFERFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "inferforge")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    major, minor = torch.cuda.get_device_capability()
    return Path(root) / "kernels" / f"int4_gemv_tc-sm{major}{minor}-{digest}.so"


def build(path: Path | None = None) -> Path:
    """Compile the library for this GPU (about 40 s) unless the cache has it."""
    path = path or library_path()
    if path.is_file():
        return path
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).is_file():
        raise BuildError("nvcc not found: the tensor-core int4 GEMV needs the CUDA toolkit to build")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise BuildError(f"the tensor-core int4 GEMV needs compute capability 8.0+, got {major}.{minor}")
    arch = f"{major}{minor}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    cmd = [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-shared",
           "-Xcompiler", "-fPIC", "-o", str(tmp), str(SOURCE)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise BuildError(f"nvcc failed ({done.returncode}): {done.stderr[-2000:]}")
    os.replace(tmp, path)
    return path


def library() -> ctypes.CDLL:
    """The loaded library (`INFERFORGE_INT4_TC_LIB` names a prebuilt one)."""
    override = os.environ.get("INFERFORGE_INT4_TC_LIB")
    path = Path(override) if override else build()
    key = str(path)
    if key not in _LIB:
        lib = ctypes.CDLL(key)
        lib.if_int4_gemv_tc.restype = ctypes.c_int
        ints, ptrs = [ctypes.c_int] * 7, [ctypes.c_void_p] * 7
        lib.if_int4_gemv_tc.argtypes = [*ptrs, *ints, ctypes.c_float, *ints[:3], ctypes.c_void_p]
        _LIB[key] = lib
    return _LIB[key]


def _outputs(
    x: torch.Tensor, n: int, residual: torch.Tensor | None, silu_pair: bool, out_dtype: torch.dtype | None
) -> tuple[torch.Tensor, int]:
    if silu_pair:
        if residual is not None or out_dtype not in (None, x.dtype):
            raise ValueError("silu_pair takes no residual and writes the activation dtype")
        return torch.empty(1, n // 2, dtype=x.dtype, device=x.device), SILU_PAIR
    if residual is not None:
        if residual.shape != (1, n) or residual.dtype != x.dtype or not residual.is_contiguous():
            raise ValueError(f"residual must be a contiguous [1, {n}] row of {x.dtype}")
        return torch.empty(1, n, dtype=x.dtype, device=x.device), RESIDUAL
    if out_dtype not in (None, x.dtype, torch.float32):
        raise ValueError(f"out_dtype must be {x.dtype} or float32, got {out_dtype}")
    return torch.empty(1, n, dtype=out_dtype or x.dtype, device=x.device), STORE


def gemv_int4_tc(
    x: torch.Tensor,
    weight: Int4Weight,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    silu_pair: bool = False,
    out_dtype: torch.dtype | None = None,
    tiles: tuple[int, int] | None = None,
) -> torch.Tensor:
    """`gemv_int4.gemv_int4` for one row x [1, K] (bf16 or fp16), without bias or RoPE epilogue: the same
    rounding (RMSNorm prologue, residual add, SiLU(gate) x up, fp32 or activation-dtype output)."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != k or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [1, {k}] row, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.scales.dtype != x.dtype:
        raise ValueError(f"x and the scales must both be bf16 or fp16, got {x.dtype} / {weight.scales.dtype}")
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"norm_weight must be [{k}] of {x.dtype}")
    mt, warps = tiles or choice(n, k) or (4, 8)
    if (mt, warps) not in CONFIGS:
        raise ValueError(f"tiles (mt, warps) must be one of {CONFIGS}, got {(mt, warps)}")
    if not supported(n, k, weight.group, silu_pair, (mt, warps)):
        raise ValueError(f"tiles {(mt, warps)} do not fit N={n}, K={k}, group={weight.group}")
    if any(t.data_ptr() % 16 for t in (x, weight.packed, *(() if norm_weight is None else (norm_weight,)))):
        raise ValueError("x, the norm weight and the packed weight must be 16-byte aligned")
    y, epilogue = _outputs(x, n, residual, silu_pair, out_dtype)
    null = 0
    rc = library().if_int4_gemv_tc(
        x.data_ptr(), null if norm_weight is None else norm_weight.data_ptr(), weight.packed.data_ptr(),
        weight.scales.data_ptr(), weight.zeros.data_ptr(), null if residual is None else residual.data_ptr(),
        y.data_ptr(), n, k, weight.group, int(weight.fma), int(x.dtype == torch.float16), epilogue,
        int(y.dtype == torch.float32), eps, mt, warps, fused.pdl_on(),
        torch.cuda.current_stream(x.device).cuda_stream,
    )  # fmt: skip
    if rc != 0:
        raise ValueError(
            f"int4 tensor-core GEMV refused N={n}, K={k}, group={weight.group}, tiles {(mt, warps)}: "
            f"code {rc}"
        )
    return y


def supported(n: int, k: int, group: int, silu_pair: bool, tiles: tuple[int, int]) -> bool:
    """The shapes the kernel takes (as `launch` in the .cu checks them): whole programs of rows, K split
    into whole groups per warp, at most 2,048 of K a warp."""
    mt, warps = tiles
    rows, per_program = (n // 2, 8 * mt) if silu_pair else (n, 16 * mt)
    quads = k // 32 // warps if k % (32 * warps) == 0 else 0
    return (
        (mt, warps) in CONFIGS
        and group in (64, 128)
        and n % 4 == 0
        and rows % per_program == 0
        and quads > 0
        and quads % (group // 32) == 0
        and k // warps <= 2048
    )


def usable(weight: Int4Weight, x: torch.Tensor, bias: torch.Tensor | None, kw: dict) -> bool:
    """Whether `decode_gemv.linear` should send this call here: switched on (`enable`), a measured winner
    (`choice`), a shape and an epilogue the kernel takes."""
    if not STATE["on"] or bias is not None or kw.get("rope_cache") is not None or not x.is_cuda:
        return False
    n, k = weight.shape
    tiles = choice(n, k)
    silu = bool(kw.get("silu_pair"))
    return tiles is not None and weight.scales.dtype == x.dtype and supported(n, k, weight.group, silu, tiles)


def enable(device: torch.device, dtype: torch.dtype) -> str | None:
    """Build and load the library, check every epilogue against `gemv_int4` on this device, and switch the
    kernel on; returns why not, if not (the engine then keeps the Triton kernel)."""
    STATE["on"] = False
    try:
        library()
        worst = check(device, dtype)
    except (BuildError, OSError, ValueError, RuntimeError) as exc:
        STATE["error"] = f"{type(exc).__name__}: {exc}"
        return STATE["error"]
    if worst > 2e-2:
        STATE["error"] = f"differs from gemv_int4 by {worst:.3g} (relative) on this device"
        return STATE["error"]
    STATE.update(on=True, error=None)
    return None


def disable() -> str:
    STATE.update(on=False, error="switched off (kernels.INT4_TC)")
    return STATE["error"]


def check(device: torch.device, dtype: torch.dtype) -> float:
    """Largest difference to `gemv_int4` relative to its largest output, over the epilogues, on random int4
    weights in gemlite's layout (one bf16 rounding is ~4e-3; a misread layout is off by O(1))."""
    from inferforge.llm.gemv_int4 import gemv_int4

    gen = torch.Generator(device="cpu").manual_seed(0)
    worst = 0.0
    for n, k, group in ((16384, 2048, 64), (2048 * 4, 2048, 128), (4096, 4096, 64)):
        packed = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(device)
        scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3).to(device, dtype)
        zeros = (-8 * scales.float()).to(dtype)
        w = Int4Weight(packed, scales, zeros, group, True)
        x = torch.randn(1, k, generator=gen).to(device, dtype)
        g = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)
        r = torch.randn(1, n, generator=gen).to(device, dtype)
        cases = [{}, {"norm_weight": g, "eps": 1e-5, "silu_pair": True}, {"residual": r},
                 {"norm_weight": g, "eps": 1e-5, "out_dtype": torch.float32}]  # fmt: skip
        for kw in cases:
            want = gemv_int4(x, w, **kw).float()  # type: ignore[arg-type]
            got = gemv_int4_tc(x, w, tiles=(4, 8), **kw).float()  # type: ignore[arg-type]
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    return worst
