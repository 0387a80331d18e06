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

    def nvcc(arch: str) -> subprocess.Popen:  # type: ignore[type-arg]
        out = str(tmp_path / f"lib{arch}.so")
        cmd = [NVCC, f"-gencode=arch=compute_{arch},code=sm_{arch}", "-O3", "-std=c++17", "-shared",
               "-Xcompiler", "-fPIC", "-Xptxas", "-v", "-o", out, str(SOURCE)]  # fmt: skip
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    # One nvcc a target, side by side (two cores in CI), each with its own report.
    builds = {arch: nvcc(arch) for arch in ("90", "80")}
    reports = {arch: p.communicate(timeout=900) for arch, p in builds.items()}
    for arch, p in builds.items():
        assert p.returncode == 0, reports[arch][1][-3000:]
    stderr = "\n".join(err for _, err in reports.values())
    # ptxas prints each kernel's name, then its stack frame and spills: pair them.
    report = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores", stderr, re.S)
    cases = re.findall(r"IF_CASE\((\d+), (\d+), (\d+)\)", SOURCE.read_text())
    assert len(report) >= 2 * 16 * len(cases), "every (tiles, group, dtype, epilogue), twice"
    # Mangled template arguments: <MT, WARPS, G, F16, EPI, STAGES>. The engine's tiles (`cuda_int4.TUNED`,
    # not imported here: it needs Triton) are (4, 8) and (1, 16), each on a ring of 4 stages.
    engine_tiles = [(4, 8, 4), (1, 16, 4)]
    assert all(tuple(str(v) for v in t) in cases for t in engine_tiles), cases
    patterns = [rf"kernelILi{m}ELi{w}ELi\d+ELb[01]ELi\dELi{st}E" for m, w, st in engine_tiles]
    engine = [name for name, _ in report if any(re.search(p, name) for p in patterns)]
    assert len(engine) == 2 * 2 * 2 * 2 * 4, engine  # targets, tiles, groups, dtypes, epilogues
    for name, spills in report:
        if name in engine:
            assert spills == "0", f"{name} spills {spills} bytes"
