from __future__ import annotations

import pytest
import torch

from inferforge.models import get_task
from inferforge.quality import Budget, judge, run_outputs


def test_identical_outputs_pass_and_nan_fails() -> None:
    task = get_task("classification")
    reference = torch.randn(32, 10, generator=torch.Generator().manual_seed(0))
    labels = reference.argmax(-1)
    ok = judge(task, reference.clone(), reference, labels, Budget())
    assert ok.passed and ok.metric_drop == 0 and ok.reasons == ()
    broken = reference.clone()
    broken[3, 2] = float("nan")
    bad = judge(task, broken, reference, labels, Budget())
    assert not bad.passed and not bad.finite and "NaN" in bad.reasons[0]


def test_budget_decides_with_named_reasons() -> None:
    task = get_task("classification")
    reference = torch.eye(10).repeat(10, 1) * 4
    labels = reference.argmax(-1)
    outputs = reference.clone()
    outputs[:5] = outputs[:5].roll(1, dims=-1)  # 5 of 100 flip: 5 points of accuracy, agreement 0.95
    strict = judge(task, outputs, reference, labels, Budget(max_metric_drop=1.0, min_fidelity=0.99))
    assert not strict.passed
    assert any("dropped 5.000 points" in r for r in strict.reasons)
    assert any("top1_agreement 0.9500 < budget 0.99" in r for r in strict.reasons)
    lenient = judge(task, outputs, reference, labels, Budget(max_metric_drop=6.0, min_fidelity=0.9))
    assert lenient.passed


def test_budget_bounds_are_checked() -> None:
    with pytest.raises(ValueError, match="min_fidelity"):
        Budget(min_fidelity=1.5)


def test_padded_outputs_equal_unpadded(digits) -> None:
    model, data = digits
    plain = run_outputs(model.module, data, batch_size=64)
    padded = run_outputs(model.module, data, batch_size=64, pad=True)
    assert plain.shape == (540, 10) and torch.allclose(plain, padded, atol=1e-5)
