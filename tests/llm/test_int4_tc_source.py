"""The tensor-core int4 GEMV's CUDA source (`llm/csrc/int4_gemv_tc.cu`) builds for Hopper and Ampere where
nvcc is installed, and the tiles the engine uses keep their registers (no spills): a broken source would
otherwise only show on a GPU machine, where the engine falls back to the Triton kernel. Running it is for
the GPU tests (`test_gpu.py`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

import inferforge.llm

SOURCE = Path(inferforge.llm.__file__).parent / "csrc" / "int4_gemv_tc.cu"
_DEFAULT = Path("/usr/local/cuda/bin/nvcc")
NVCC = shutil.which("nvcc") or (str(_DEFAULT) if _DEFAULT.is_file() else None)


@pytest.mark.skipif(NVCC is None, reason="needs nvcc")
def test_source_builds_for_hopper_and_ampere_without_spills_in_the_engine_s_tiles(tmp_path: Path) -> None:
    """sm_90 (the H100 it was measured on) and sm_80 (A100: programmatic dependent launch compiled out)."""
    assert NVCC is not None
    out = subprocess.run(
        [NVCC, "-gencode=arch=compute_90,code=sm_90", "-gencode=arch=compute_80,code=sm_80", "-O3",
         "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
         "-Xptxas", "-v", "-o", str(tmp_path / "lib.so"), str(SOURCE)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    # ptxas prints each kernel's name, then its stack frame and spills: pair them.
    report = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", out.stderr, re.S)
    assert len(report) >= 2 * 96, "expected every (tiles, group, dtype, epilogue) kernel, for both targets"
    # Mangled template arguments: <MT, WARPS, G, F16, EPI>; the engine's tiles are (4, 8) and (1, 8).
    for name, spills in report:
        if re.search(r"kernelILi(4|1)ELi8E", name):
            assert spills == "0", f"{name} spills {spills} bytes"
