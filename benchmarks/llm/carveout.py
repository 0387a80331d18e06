"""One shared-memory / L1 split for every Triton kernel of the package (`cuFuncSetAttribute` with
`CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT`).

Left to the driver, each kernel of a decode step gets its own split (Nsight Compute, K1 of 2026-11-23: the
int8 chain asks for 64, 228, 100, 64 and 32 KB of shared memory in turn; the attention kernel 228 KB because
Triton raises its opt-in limit to the maximum). An SM runs blocks of one split at a time, so a kernel whose
split differs from the one its predecessor's blocks still hold cannot place its blocks there until those
finish: the loads that programmatic dependent launch lets a kernel issue before its wait do not start early
on those SMs. One split for the whole chain removes that.
"""

from __future__ import annotations

import ctypes
import sys

_CARVEOUT_ATTRIBUTE = 9  # CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT
_MODULES = (
    "inferforge.llm.gemv",
    "inferforge.llm.gemv_int4",
    "inferforge.llm.triton_attn",
    "inferforge.llm.triton_varlen_attn",
    "inferforge.llm.fused",
)
_STATE: dict[str, object] = {"percent": None, "hooked": False, "libcuda": None}


def _set(function: int, percent: int) -> None:
    lib = _STATE["libcuda"]
    if lib is None:
        lib = _STATE["libcuda"] = ctypes.CDLL("libcuda.so.1")
    err = lib.cuFuncSetAttribute(ctypes.c_void_p(function), _CARVEOUT_ATTRIBUTE, ctypes.c_int(percent))
    if err != 0:
        raise RuntimeError(f"cuFuncSetAttribute(PREFERRED_SHARED_MEMORY_CARVEOUT, {percent}) failed: {err}")


def _jit_function(obj: object, jit_type: type) -> object | None:
    """obj itself, or the JITFunction an autotuner or heuristics wrapper holds in `.fn`."""
    if isinstance(obj, jit_type):
        return obj
    inner = getattr(obj, "fn", None)
    return inner if isinstance(inner, jit_type) else None


def _loaded_kernels() -> list:
    """Every compiled kernel of the package's Triton functions loaded so far, on any device."""
    from triton.runtime.jit import JITFunction

    kernels = []
    for name in _MODULES:
        module = sys.modules.get(name)
        for obj in vars(module).values() if module else ():
            fn = _jit_function(obj, JITFunction)
            if fn is not None:
                for caches in fn.device_caches.values():
                    kernels.extend(caches[0].values())
    return kernels


def _on_load(module, function, name, metadata_group, hash) -> None:
    percent = _STATE["percent"]
    if percent is not None and name in _kernel_names():
        _set(function, percent)  # type: ignore[arg-type]


def _kernel_names() -> set[str]:
    from triton.runtime.jit import JITFunction

    names = set()
    for name in _MODULES:
        module = sys.modules.get(name)
        for obj in vars(module).values() if module else ():
            fn = _jit_function(obj, JITFunction)
            if fn is not None:
                names.add(fn.__name__)
    return names


def set_carveout(percent: int | None) -> int:
    """Give every Triton kernel of the package (loaded now or later) the split `percent` (0 = most L1, 100 =
    most shared memory; None = the driver's choice, -1). Graphs captured afterwards use it. Returns the number
    of kernels changed now."""
    from triton import knobs

    _STATE["percent"] = percent
    if not _STATE["hooked"]:
        knobs.runtime.kernel_load_end_hook.add(_on_load)
        _STATE["hooked"] = True
    kernels = _loaded_kernels()
    for k in kernels:
        if k.function is not None:
            _set(k.function, -1 if percent is None else percent)
    return len(kernels)
