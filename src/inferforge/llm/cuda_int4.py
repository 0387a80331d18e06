"""The tensor-core batch-1 int4 GEMV (`csrc/int4_gemv_tc.cu`), built with nvcc on first use and called
through ctypes: no torch extension build; the library links the CUDA runtime statically and takes raw
pointers and the current stream, so CUDA-graph capture and programmatic dependent launch work as for the
Triton kernels.

Why a CUDA kernel: Triton cannot place dequantized nibbles into `mma` operand registers, and the Triton int4
GEMV (`gemv_int4.py`) is bound by instruction issue (~7 SASS instructions a weight, Nsight run L2 of
2026-11-23). Here a nibble pair becomes an operand by one shift and one lop3 and the tensor cores multiply
and sum. It wins on gate/up, down and the LM head (with a ring of shared-memory stages a warp, runs N2-N5)
and loses on q/k/v and o, whose time is latency (runs M3-M6, N3-N6 in docs/llm-runs.md), so `choice` sends
only the measured winners to it.
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
from inferforge.llm.gemv import RESIDUAL, ROPE_CACHE, SILU_PAIR, STORE, RopeCache
from inferforge.llm.gemv_int4 import Int4Weight

SOURCE = Path(__file__).parent / "csrc" / "int4_gemv_tc.cu"
# (rows a program / 16, warps a program[, stages]) the library is built for: without stages a warp keeps its
# whole K range in shared memory; with them, a ring of that many quads of packed rows, so a program's
# footprint no longer grows with K.
CONFIGS = [
    (1, 8), (1, 16), (2, 8), (2, 16), (4, 4), (4, 8),
    (1, 8, 4), (1, 8, 8), (1, 16, 2), (1, 16, 4), (1, 16, 8), (2, 16, 4), (4, 8, 2), (4, 8, 4),
]  # fmt: skip
Tiles = tuple[int, ...]  # (mt, warps) or (mt, warps, stages)
# Which products take this kernel, by (N, K), decided in the decode step (CUDA graph, H100, docs/llm-runs.md
# runs M3-M6 and N1-N9; bf16 953-959 us in the same calls):
# - gate/up (RMSNorm, SiLU x up) and the LM head (RMSNorm, fp32 logits), 64 rows and 8 warps a program: the
#   int4 step 709-713 -> 602-613 us with their whole K range in shared memory (M4, M6), 527-531 us on rings
#   of 2-4 stages (N4): each kernel is shorter (N9's timelines; the overlap with its neighbours is unchanged).
# - down, 16 rows and 16 warps a program on a ring of 4-8 stages: 604-608 -> 557-567 us (N2-N4). With its
#   whole K range in shared memory it lost (604-605 in the step, N3), as did rings at 32 rows (640-642, N3) or
#   8 warps (662-665, N4).
# - q/k/v (RMSNorm, RoPE + cache) and o lost (632-638 against 602-605 us, M6; 585-589 against 563-567,
#   N3; 572-575 for o on rings, N2): narrow products are latency, where the Triton kernel's single tile is
#   shorter.
# Other shapes: products at least 8,192 rows wide, gate/up's tiles. Measured on the H100 only; the kernel
# also builds and runs on Ampere and Ada (sm_80+, without PDL), untimed there.
TUNED: dict[tuple[int, int], Tiles | None] = {
    (3072, 2048): None,
    (2048, 2048): None,
    (2048, 8192): (1, 16, 4),
    (16384, 2048): (4, 8, 4),
    (128256, 2048): (4, 8, 4),
}
WIDE: Tiles = (4, 8, 4)
# RMSNorm prologue (gate/up, the LM head): each warp sums the squares of its own K range and the program's
# warps meet in shared memory (True), or every warp reads the whole row from L2 before its first product
# (False, as measured up to N10). O7, three rounds in turn: 522 / 519 / 523 us a step against 535 / 524 /
# 528 (bf16 951 in the same call).
NORM = {"shared": True}
STATE: dict = {"on": False, "error": None}
_LIB: dict[tuple, ctypes.CDLL] = {}


class BuildError(RuntimeError):
    """nvcc is missing or failed: the engine keeps the Triton kernel."""


def choice(n: int, k: int) -> Tiles | None:
    """The tiles for a product of N x K, or None: keep `gemv_int4`."""
    if (n, k) in TUNED:
        return TUNED[(n, k)]
    return WIDE if n >= 8192 and k <= 8 * 2048 else None


def library_path(name: str = "int4_gemv_tc", sources: tuple[Path, ...] = (SOURCE,)) -> Path:
    """Where a built library is cached: keyed by its sources' digest and the compute capability."""
    root = os.environ.get("INFERFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "inferforge")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    major, minor = torch.cuda.get_device_capability()
    return Path(root) / "kernels" / f"{name}-sm{major}{minor}-{digest}.so"


def build(path: Path | None = None, source: Path = SOURCE, what: str = "the tensor-core int4 GEMV") -> Path:
    """Compile `source` into a shared library for this GPU (about 85 s of one core for sm_90 for this
    module's kernel) unless the cache has it."""
    path = path or library_path()
    if path.is_file():
        return path
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not Path(nvcc).is_file():
        raise BuildError(f"nvcc not found: {what} needs the CUDA toolkit to build")
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        raise BuildError(f"{what} needs compute capability 8.0+, got {major}.{minor}")
    arch = f"{major}{minor}"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    cmd = [nvcc, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-shared",
           "-Xcompiler", "-fPIC", "-o", str(tmp), str(source)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise BuildError(f"nvcc failed ({done.returncode}): {done.stderr[-2000:]}")
    os.replace(tmp, path)
    return path


def library() -> ctypes.CDLL:
    """The loaded library (`INFERFORGE_INT4_TC_LIB` names a prebuilt one), resolved once per override and
    GPU kind: every launch calls this, and the cache path hashes the source."""
    override = os.environ.get("INFERFORGE_INT4_TC_LIB")
    key = (override, torch.cuda.get_device_capability())
    if key not in _LIB:
        lib = ctypes.CDLL(str(Path(override) if override else build()))
        lib.if_int4_gemv_tc.restype = ctypes.c_int
        ints, ptrs = [ctypes.c_int] * 7, [ctypes.c_void_p] * 7
        lib.if_int4_gemv_tc.argtypes = [*ptrs, *ints, ctypes.c_float, *ints[:3], *ptrs[:7], ctypes.c_longlong,
                                        *ints[:6]]  # fmt: skip
        _LIB[key] = lib
    return _LIB[key]


def _outputs(
    x: torch.Tensor,
    n: int,
    residual: torch.Tensor | None,
    silu_pair: bool,
    out_dtype: torch.dtype | None,
    rc: RopeCache | None,
) -> tuple[torch.Tensor, int]:
    if rc is not None:
        d = rc.k_cache.shape[-1]
        if n != (rc.heads + 2 * rc.kv_heads) * d or residual is not None or silu_pair:
            raise ValueError(
                f"rope_cache needs N = (heads + 2 kv_heads) * D = {(rc.heads + 2 * rc.kv_heads) * d}"
            )
        tables = (rc.cos, rc.sin, rc.k_cache, rc.v_cache)
        if any(t.dtype != x.dtype or not t.is_contiguous() for t in tables):
            raise ValueError("rope_cache tables and caches must be contiguous and of the activation dtype")
        if any(t.dtype not in (torch.int32, torch.int64) for t in (rc.positions, rc.slots)):
            raise ValueError("rope_cache positions and slots must be int32 or int64")
        return torch.empty(1, rc.heads, d, dtype=x.dtype, device=x.device), ROPE_CACHE
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
    rope_cache: RopeCache | None = None,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """`gemv_int4.gemv_int4` for one row x [1, K] (bf16 or fp16), without bias: the same rounding (RMSNorm
    prologue; residual add, SiLU(gate) x up, RoPE + cache write, fp32 or activation-dtype output)."""
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or x.shape[1] != k or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous [1, {k}] row, got {tuple(x.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16) or weight.scales.dtype != x.dtype:
        raise ValueError(f"x and the scales must both be bf16 or fp16, got {x.dtype} / {weight.scales.dtype}")
    if norm_weight is not None and (norm_weight.shape != (k,) or norm_weight.dtype != x.dtype):
        raise ValueError(f"norm_weight must be [{k}] of {x.dtype}")
    tiles = tiles or choice(n, k) or WIDE
    if tiles not in CONFIGS:
        raise ValueError(f"tiles (mt, warps[, stages]) must be one of {CONFIGS}, got {tiles}")
    mt, warps, stages = (*tiles, 0)[:3]
    d = None if rope_cache is None else rope_cache.k_cache.shape[-1]
    if not supported(n, k, weight.group, silu_pair, tiles, d):
        raise ValueError(f"tiles {tiles} do not fit N={n}, K={k}, group={weight.group}")
    if any(t.data_ptr() % 16 for t in (x, weight.packed, *(() if norm_weight is None else (norm_weight,)))):
        raise ValueError("x, the norm weight and the packed weight must be 16-byte aligned")
    y, epilogue = _outputs(x, n, residual, silu_pair, out_dtype, rope_cache)
    null = 0
    rc = rope_cache
    wide = 0 if rc is None else (rc.positions.dtype == torch.int64) + 2 * (rc.slots.dtype == torch.int64)
    rope = (null,) * 6 + (0, 0, 0, 0, 0) if rc is None else (
        rc.cos.data_ptr(), rc.sin.data_ptr(), rc.positions.data_ptr(), rc.slots.data_ptr(),
        rc.k_cache.data_ptr(), rc.v_cache.data_ptr(), rc.kv_heads * rc.k_cache.shape[-1], rc.heads,
        rc.kv_heads, rc.k_cache.shape[-1], wide,
    )  # fmt: skip
    code = library().if_int4_gemv_tc(
        x.data_ptr(), null if norm_weight is None else norm_weight.data_ptr(), weight.packed.data_ptr(),
        weight.scales.data_ptr(), weight.zeros.data_ptr(), null if residual is None else residual.data_ptr(),
        y.data_ptr(), n, k, weight.group, int(weight.fma), int(x.dtype == torch.float16), epilogue,
        int(y.dtype == torch.float32), eps, mt, warps, fused.pdl_on(),
        torch.cuda.current_stream(x.device).cuda_stream, *rope, stages, int(NORM["shared"]),
    )  # fmt: skip
    if code != 0:
        raise ValueError(
            f"int4 tensor-core GEMV refused N={n}, K={k}, group={weight.group}, tiles {tiles}: code {code}"
        )
    return y


def supported(n: int, k: int, group: int, silu_pair: bool, tiles: Tiles, head_dim: int | None = None) -> bool:
    """The shapes the kernel takes (as `launch` in the .cu checks them): whole programs of rows (for RoPE,
    `head_dim` given: whole programs in each half of a head), K split into whole groups per warp, at most
    2,048 of K a warp."""
    mt, warps = tiles[0], tiles[1]
    if head_dim is not None and (head_dim // 2) % (8 * mt):
        return False
    paired = silu_pair or head_dim is not None
    rows, per_program = (n // 2, 8 * mt) if paired else (n, 16 * mt)
    quads = k // 32 // warps if k % (32 * warps) == 0 else 0
    return (
        tiles in CONFIGS
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
    if not STATE["on"] or bias is not None or not x.is_cuda:
        return False
    n, k = weight.shape
    tiles = choice(n, k)
    silu, rc = bool(kw.get("silu_pair")), kw.get("rope_cache")
    d = rc.k_cache.shape[-1] if isinstance(rc, RopeCache) else None
    return (
        tiles is not None and weight.scales.dtype == x.dtype and supported(n, k, weight.group, silu, tiles, d)
    )


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


def _random_weight(
    n: int, k: int, group: int, device: torch.device, dtype: torch.dtype, gen: torch.Generator
) -> Int4Weight:
    """Random int4 weights in gemlite's layout (fma mode, zeros -8 x scale), drawn from `gen` on the CPU."""
    packed = torch.randint(-(2**31), 2**31 - 1, (k // 8, n), generator=gen, dtype=torch.int32).to(device)
    scales = (torch.rand(k // group, n, generator=gen) * 0.01 + 1e-3).to(device, dtype)
    return Int4Weight(packed, scales, (-8 * scales.float()).to(dtype), group, True)


def check(device: torch.device, dtype: torch.dtype) -> float:
    """Largest difference to `gemv_int4` relative to its largest output, over the epilogues and every tile
    configuration `TUNED` uses, on random int4 weights in gemlite's layout (one bf16 rounding is ~4e-3; a
    misread layout is off by O(1))."""
    from inferforge.llm.gemv_int4 import gemv_int4

    gen = torch.Generator(device="cpu").manual_seed(0)
    in_use = sorted({t for t in TUNED.values() if t} | {WIDE})
    worst = 0.0
    for n, k, group in ((16384, 2048, 64), (2048 * 4, 2048, 128), (4096, 4096, 64)):
        w = _random_weight(n, k, group, device, dtype, gen)
        x = torch.randn(1, k, generator=gen).to(device, dtype)
        g = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)
        r = torch.randn(1, n, generator=gen).to(device, dtype)
        cases = [{}, {"norm_weight": g, "eps": 1e-5, "silu_pair": True}, {"residual": r},
                 {"norm_weight": g, "eps": 1e-5, "out_dtype": torch.float32}]  # fmt: skip
        for kw in cases:
            want = gemv_int4(x, w, **kw).float()  # type: ignore[arg-type]
            for tiles in in_use:
                if not supported(n, k, group, bool(kw.get("silu_pair")), tiles):
                    continue
                got = gemv_int4_tc(x, w, tiles=tiles, **kw).float()  # type: ignore[arg-type]
                worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    return max(worst, _check_rope(device, dtype, gen))


def _check_rope(device: torch.device, dtype: torch.dtype, gen: torch.Generator) -> float:
    """q, and the k and v written into the cache, against `gemv_int4`'s RoPE epilogue (the q/k/v shape of
    the 1.2B model: 32 + 2 x 8 heads of 64)."""
    from inferforge.llm.gemv_int4 import gemv_int4

    heads, kv_heads, d, k = 32, 8, 64, 2048
    n = (heads + 2 * kv_heads) * d
    w = _random_weight(n, k, 64, device, dtype, gen)
    x = torch.randn(1, k, generator=gen).to(device, dtype)
    g = (torch.rand(k, generator=gen) + 0.5).to(device, dtype)
    cos, sin = (torch.randn(100, d, generator=gen).to(device, dtype) for _ in range(2))
    caches = [torch.randn(4, 16, kv_heads, d, generator=gen).to(device, dtype) for _ in range(2)]
    outs = []
    for fn in (gemv_int4, lambda *a, **kw: gemv_int4_tc(*a, tiles=(1, 8), **kw)):
        kc, vc = (c.clone() for c in caches)
        pos, slot = torch.tensor([57], device=device), torch.tensor([37], device=device)
        q = fn(
            x, w, norm_weight=g, eps=1e-5, rope_cache=RopeCache(cos, sin, pos, slot, kc, vc, heads, kv_heads)
        )
        outs.append((q.float(), kc.float(), vc.float()))
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(outs[1], outs[0], strict=True))
