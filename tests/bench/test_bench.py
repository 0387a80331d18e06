from __future__ import annotations

import numpy as np
import pytest

from inferforge.bench import BenchConfig, measure
from inferforge.bench.scenarios import server_scenario, simulate_server
from inferforge.bench.timing import Timing, rotating_batches
from inferforge.techniques import Recipe, apply_recipe


@pytest.fixture(scope="module")
def fp32_report(digits):
    model, data = digits
    variant = apply_recipe(Recipe.parse("fp32"), model, data.rows(slice(0, 2)), "cpu")
    return measure(
        variant, data, (1, 16), BenchConfig(warmup=2, min_iters=10, min_time_s=0.05), latency_slo_ms=50
    )


def test_percentiles_are_ordered_and_throughput_consistent(fp32_report) -> None:
    for batch, timing in fp32_report.per_batch.items():
        assert timing.iters >= 10 and len(timing.samples_ms) == timing.iters
        assert 0 < timing.min_ms <= timing.p50_ms <= timing.p90_ms <= timing.p99_ms
        # wall-clock throughput cannot beat the fastest single call
        assert timing.throughput <= batch / (timing.min_ms / 1e3) * 1.05
    from inferforge.models import load_model

    state = load_model("builtin:digits").module.state_dict().values()
    assert fp32_report.size_bytes == sum(t.numel() * t.element_size() for t in state)


def test_rotating_batches_hold_different_real_rows(digits) -> None:
    model, data = digits
    variant = apply_recipe(Recipe.parse("fp32"), model, data.rows(slice(0, 2)), "cpu")
    batches = rotating_batches(data, 8, 4, variant)
    assert len({tuple(b[0][:, :8].flatten().tolist()) for b in batches}) == 4
    assert all(float(b[0].abs().sum()) > 0 for b in batches)


def _timing(batch: int, ms: float) -> Timing:
    return Timing(batch, 10, ms, ms, ms, ms, ms, batch / ms * 1e3, 0.0, (ms,) * 10)


def test_simulated_server_queues_when_overloaded() -> None:
    per_batch = {1: _timing(1, 1.0), 8: _timing(8, 2.0)}  # capacity: 4,000 items/s at batch 8
    light, _ = simulate_server(per_batch, qps=50)
    heavy, mean_batch = simulate_server(per_batch, qps=3900)
    assert np.percentile(light, 50) == pytest.approx(1.0, abs=0.3)
    assert np.percentile(heavy, 99) > np.percentile(light, 99) and mean_batch > 4
    scenario = server_scenario(per_batch, slo_ms=10.0)
    assert 0 < scenario.max_qps <= 4000 and scenario.p99_ms <= 10.0


def test_timing_json_has_no_samples(fp32_report) -> None:
    data = fp32_report.to_json()
    assert "samples_ms" not in data["per_batch"]["1"]
    assert data["offline"]["batch_size"] in (1, 16) and data["server"]["slo_ms"] == 50
