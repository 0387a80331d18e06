"""Where gemlite's tuned configurations are kept: one JSON file per GPU model, gemlite and Triton version,
under INFERFORGE_CACHE. gemlite needs a GPU, so its module and the device name are stand-ins here; the
load/save round trip runs on the device (benchmarks/llm/bench_decode.py --sections quantstart)."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
import torch

from inferforge.llm import quant


def test_path_names_the_gpu_and_versions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERFORGE_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemlite", types.SimpleNamespace(__version__="0.6.0.post2"))
    monkeypatch.setitem(sys.modules, "triton", types.SimpleNamespace(__version__="3.6.0"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    path = quant.tuned_config_path(torch.device("cuda"))
    assert path == tmp_path / "gemlite-NVIDIA-H100-80GB-HBM3-0.6.0.post2-triton3.6.0.json"
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert quant.tuned_config_path(torch.device("cuda")) != path  # another GPU keeps its own file
