"""`quant.SPLITK_NARROW`: which gemlite kernel an 8-bit layer's call goes to. gemlite needs a GPU, so a layer
with gemlite's two entry points stands in for the routing only; the kernels run in the GPU benchmarks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from inferforge.llm import quant


class _TwoEntryLayer(nn.Module):
    """gemlite's `forward` (its own kernel choice) and `forward_manual(x, matmul_type)`; records each call."""

    def __init__(self, out_features: int) -> None:
        super().__init__()
        self.out_features, self.calls = out_features, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append("auto")
        return x

    def forward_manual(self, x: torch.Tensor, matmul_type: str) -> torch.Tensor:
        self.calls.append(matmul_type)
        return x


@pytest.mark.parametrize(("on", "n", "rows", "want"), [
    (True, 2048, 64, "GEMM_SPLITK"),  # narrow, 64 rows: split-K
    (True, 8192, 16, "GEMM_SPLITK"),
    (True, 16384, 64, "auto"),  # wide (gate/up, LM head): gemlite's choice
    (True, 2048, 1, "auto"),  # up to 4 rows stay on gemlite's GEMV choice
    (True, 2048, 4, "auto"),
    (True, 2048, 128, "auto"),  # past max_rows
    (False, 2048, 64, "auto"),  # knob off
])  # fmt: skip
def test_narrow_layers_take_split_k_up_to_max_rows(
    on: bool, n: int, rows: int, want: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(quant.SPLITK_NARROW, "on", on)
    layer = quant._split_k_when_narrow(_TwoEntryLayer(n), "int8")
    layer(torch.zeros(rows, 8))
    assert layer.calls == [want]


def test_formats_not_listed_keep_gemlite_s_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(quant.SPLITK_NARROW, "formats", ("int8",))
    layer = quant._split_k_when_narrow(_TwoEntryLayer(2048), "int4")
    layer(torch.zeros(64, 8))
    assert layer.calls == ["auto"]
