"""The engine on a real tiny torch model: batching correctness, limits, deadlines, failures and draining."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from inferforge.registry.servable import BatchingHints, TensorSpec
from inferforge.serve.engine import (
    BatcherConfig,
    DeadlineExceeded,
    Engine,
    InferRequest,
    InvalidRequest,
    ModelExecutionError,
    Overloaded,
    ShuttingDown,
)

from .tiny import TinyServable


def _inputs(rows: int, seed: int, features: int = 8) -> dict[str, np.ndarray]:
    return {"input": np.random.default_rng(seed).standard_normal((rows, features)).astype(np.float32)}


async def _gather(engine: Engine, model: str, requests: list[InferRequest]):
    return await asyncio.gather(*(engine.infer(model, None, r) for r in requests), return_exceptions=True)


def test_every_batched_response_matches_the_same_input_run_alone() -> None:
    model = TinyServable("m", "1", delay_s=0.005, max_batch_size=16)
    reference = TinyServable("m", "1")  # same seed, same weights, never batched
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=16, max_queue_delay_us=5000))
    sizes = [1, 3, 2, 5, 1, 4, 7, 1, 2, 6] * 4
    requests = [InferRequest(str(i), _inputs(n, i)) for i, n in enumerate(sizes)]
    responses = asyncio.run(_gather(engine, "m", requests))
    engine.shutdown()
    for req, resp in zip(requests, responses, strict=True):
        alone = reference.predict(req.inputs)
        assert resp.id == req.id
        np.testing.assert_allclose(resp.outputs["logits"], alone["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(resp.outputs["label"], alone["label"])
    assert max(model.batch_sizes_seen) > 7, "requests were never batched together"
    assert max(model.batch_sizes_seen) <= 16
    assert sum(model.batch_sizes_seen) == sum(sizes)


def test_output_selection_returns_only_the_named_outputs() -> None:
    engine = Engine()
    engine.add([TinyServable("m", "1")], BatcherConfig())
    resp = asyncio.run(engine.infer("m", None, InferRequest("a", _inputs(2, 0), outputs=("label",))))
    engine.shutdown()
    assert list(resp.outputs) == ["label"]
    assert resp.outputs["label"].shape == (2,)


def test_padding_runs_only_fixed_sizes_and_returns_real_rows() -> None:
    model = TinyServable("m", "1", delay_s=0.002)
    reference = TinyServable("m", "1")
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=8, pad_batch_sizes=(4, 8), max_queue_delay_us=3000))
    requests = [InferRequest(str(i), _inputs(n, i)) for i, n in enumerate([1, 2, 3, 1, 5, 2])]
    responses = asyncio.run(_gather(engine, "m", requests))
    engine.shutdown()
    assert set(model.batch_sizes_seen) <= {4, 8}
    for req, resp in zip(requests, responses, strict=True):
        assert resp.outputs["logits"].shape[0] == req.rows
        np.testing.assert_allclose(
            resp.outputs["logits"], reference.predict(req.inputs)["logits"], rtol=1e-5, atol=1e-6
        )


def test_a_preferred_size_closes_a_batch_before_the_queue_delay() -> None:
    model = TinyServable("m", "1")
    engine = Engine()
    engine.add(
        [model], BatcherConfig(max_batch_size=16, preferred_batch_sizes=(4,), max_queue_delay_us=3_000_000)
    )
    start = time.monotonic()
    futures = [engine.submit("m", None, InferRequest(str(i), _inputs(1, i))) for i in range(4)]
    for f in futures:
        f.result(10)
    waited = time.monotonic() - start
    engine.shutdown()
    assert model.batch_sizes_seen == [4]
    assert waited < 1.5, f"the batch waited {waited:.2f} s although it reached a preferred size"


def test_without_a_preferred_size_a_batch_waits_out_the_queue_delay() -> None:
    model = TinyServable("m", "1")
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=16, max_queue_delay_us=300_000))
    start = time.monotonic()
    futures = [engine.submit("m", None, InferRequest(str(i), _inputs(1, i))) for i in range(3)]
    for f in futures:
        f.result(10)
    waited = time.monotonic() - start
    engine.shutdown()
    assert model.batch_sizes_seen == [3]
    assert waited >= 0.29


class VariableLength:
    """A model whose inner dimension varies: requests of different lengths must never share a batch."""

    name, version, platform, device = "var", "1", "numpy", "cpu"
    inputs = (TensorSpec("tokens", "INT64", (-1, -1)),)
    outputs = (TensorSpec("total", "INT64", (-1,)),)
    batching = BatchingHints(max_batch_size=8)

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def predict(self, inputs):  # type: ignore[no-untyped-def]
        self.shapes.append(inputs["tokens"].shape)
        time.sleep(0.01)
        return {"total": inputs["tokens"].sum(axis=1)}

    def close(self) -> None:
        pass


def test_requests_of_different_inner_shapes_are_grouped_not_mixed() -> None:
    model = VariableLength()
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=8, max_queue_delay_us=5000))
    lengths = [3, 5, 3, 5, 7, 3]
    requests = [
        InferRequest(str(i), {"tokens": np.arange(n, dtype=np.int64)[None, :] + i})
        for i, n in enumerate(lengths)
    ]
    responses = asyncio.run(_gather(engine, "var", requests))
    engine.shutdown()
    for req, resp in zip(requests, responses, strict=True):
        assert resp.outputs["total"].tolist() == [int(req.inputs["tokens"].sum())]
    assert len(model.shapes) < len(lengths), "same-length requests should have been batched"
    assert sorted({s[1] for s in model.shapes}) == [3, 5, 7]


class Echo:
    """Returns its input itself: the output aliases the reused staging buffer and must be copied out."""

    name, version, platform, device = "echo", "1", "numpy", "cpu"
    inputs = (TensorSpec("x", "FP32", (-1, 4)),)
    outputs = (TensorSpec("y", "FP32", (-1, 4)),)
    batching = BatchingHints(max_batch_size=4)

    def predict(self, inputs):  # type: ignore[no-untyped-def]
        time.sleep(0.005)
        return {"y": inputs["x"]}

    def close(self) -> None:
        pass


def test_outputs_that_alias_the_reused_input_buffer_are_not_overwritten() -> None:
    engine = Engine()
    engine.add([Echo()], BatcherConfig(max_batch_size=4))
    xs = [np.full((1 + i % 3, 4), float(i), np.float32) for i in range(30)]
    futures = [engine.submit("echo", None, InferRequest(str(i), {"x": x})) for i, x in enumerate(xs)]
    answers = [f.result(10).outputs["y"] for f in futures]
    engine.shutdown()
    for x, y in zip(xs, answers, strict=True):
        np.testing.assert_array_equal(y, x)


@pytest.mark.parametrize(
    ("inputs", "fragment"),
    [
        ({"image": np.zeros((1, 8), np.float32)}, "no input 'image'"),
        ({}, "input 'input' is missing"),
        ({"input": np.zeros((1, 8), np.float64)}, "input 'input' has datatype float64"),
        ({"input": np.zeros((1, 9), np.float32)}, "dimension 1 must be 8"),
        ({"input": np.zeros((8,), np.float32)}, "expected 2 dims"),
        ({"input": np.zeros((17, 8), np.float32)}, "batch size 17 is outside 1..16"),
    ],
)
def test_invalid_requests_name_the_tensor(inputs: dict, fragment: str) -> None:
    engine = Engine()
    engine.add([TinyServable("m", "1", max_batch_size=16)], BatcherConfig(max_batch_size=16))
    with pytest.raises(InvalidRequest, match=fragment.replace("(", r"\(").replace(".", r"\.")):
        engine.submit("m", None, InferRequest("x", inputs))
    engine.shutdown()


def test_unknown_output_is_refused() -> None:
    engine = Engine()
    engine.add([TinyServable("m", "1")], BatcherConfig())
    with pytest.raises(InvalidRequest, match="no output 'probs'"):
        engine.submit("m", None, InferRequest("x", _inputs(1, 0), outputs=("probs",)))
    engine.shutdown()


def test_full_queue_refuses_instead_of_growing() -> None:
    engine = Engine()
    engine.add(
        [TinyServable("m", "1", delay_s=0.3, max_batch_size=1)],
        BatcherConfig(max_batch_size=1, max_queue_size=2),
    )
    futures, refused = [], 0
    for i in range(8):
        try:
            futures.append(engine.submit("m", None, InferRequest(str(i), _inputs(1, i))))
        except Overloaded as exc:
            refused += 1
            assert exc.retry_after_s >= 1
    assert refused >= 4 and len(futures) <= 4
    engine.shutdown()
    assert all(f.done() and f.exception() is None for f in futures), (
        "accepted requests must still be answered"
    )


def test_past_deadline_requests_are_answered_not_dropped() -> None:
    engine = Engine()
    engine.add([TinyServable("m", "1", delay_s=0.3, max_batch_size=1)], BatcherConfig(max_batch_size=1))

    async def run():
        now = time.monotonic()
        slow = engine.infer("m", None, InferRequest("first", _inputs(1, 0), deadline=now + 5))
        late = engine.infer("m", None, InferRequest("late", _inputs(1, 1), deadline=now + 0.05))
        return await asyncio.gather(slow, late, return_exceptions=True)

    first, late = asyncio.run(run())
    engine.shutdown()
    assert first.id == "first"
    assert isinstance(late, DeadlineExceeded) and "'late'" in str(late)


def test_a_cancelled_caller_frees_its_queue_slot_and_the_batch_never_runs_it() -> None:
    model = TinyServable("m", "1", delay_s=0.3, max_batch_size=1)
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=1))

    async def run():  # type: ignore[no-untyped-def]
        first = asyncio.create_task(engine.infer("m", None, InferRequest("first", _inputs(1, 0))))
        await asyncio.sleep(0.1)  # first is running; second waits in the queue
        second = asyncio.create_task(engine.infer("m", None, InferRequest("second", _inputs(1, 1))))
        await asyncio.sleep(0.05)
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        return await first

    assert asyncio.run(run()).id == "first"
    engine.shutdown()
    assert model.batch_sizes_seen == [1], "the cancelled request still ran"


def test_statistics_split_each_batch_into_input_infer_and_output() -> None:
    engine = Engine()
    runner = engine.add(
        [TinyServable("m", "1", delay_s=0.02, max_batch_size=4)], BatcherConfig(max_batch_size=4)
    )
    asyncio.run(_gather(engine, "m", [InferRequest(str(i), _inputs(1, i)) for i in range(3)]))
    engine.shutdown()
    doc = runner.stats.to_json("m", "1")
    inference = doc["inference_stats"]
    assert doc["inference_count"] == 3 and inference["queue"]["count"] == 3
    assert inference["compute_infer"]["count"] == 3  # each request is charged its batch's time
    assert sum(b["compute_infer"]["count"] for b in doc["batch_stats"]) == doc["execution_count"]
    per_execution = sum(b["compute_infer"]["ns"] for b in doc["batch_stats"]) / doc["execution_count"]
    assert per_execution >= 0.02e9  # the model's sleep is inside compute_infer
    assert inference["success"]["count"] == 0  # outcomes are the protocol adapter's to record


def test_queued_request_past_deadline_gets_an_error_from_the_engine() -> None:
    engine = Engine()
    engine.add([TinyServable("m", "1", delay_s=0.2, max_batch_size=1)], BatcherConfig(max_batch_size=1))
    now = time.monotonic()
    first = engine.submit("m", None, InferRequest("a", _inputs(1, 0), deadline=now + 5))
    second = engine.submit("m", None, InferRequest("b", _inputs(1, 1), deadline=now + 0.05))
    assert first.result(5).id == "a"
    with pytest.raises(DeadlineExceeded):
        second.result(5)
    engine.shutdown()


def test_a_failing_batch_fails_its_requests_and_the_worker_goes_on() -> None:
    model = TinyServable("m", "1")
    original = model.predict
    calls = []

    def flaky(inputs):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return original(inputs)

    model.predict = flaky  # type: ignore[method-assign]
    engine = Engine()
    engine.add([model], BatcherConfig())
    with pytest.raises(ModelExecutionError, match="out of memory"):
        engine.submit("m", None, InferRequest("a", _inputs(1, 0))).result(5)
    assert engine.submit("m", None, InferRequest("b", _inputs(1, 0))).result(5).outputs["logits"].shape == (
        1,
        4,
    )
    engine.shutdown()


def test_shutdown_finishes_queued_requests_then_refuses() -> None:
    model = TinyServable("m", "1", delay_s=0.02, max_batch_size=2)
    engine = Engine()
    engine.add([model], BatcherConfig(max_batch_size=2))
    futures = [engine.submit("m", None, InferRequest(str(i), _inputs(1, i))) for i in range(10)]
    engine.shutdown()
    assert [f.result(0).id for f in futures] == [str(i) for i in range(10)]
    assert model.closed
    with pytest.raises(ShuttingDown):
        engine.submit("m", None, InferRequest("late", _inputs(1, 0)))


def test_several_instances_each_run_batches() -> None:
    a, b = TinyServable("m", "1", delay_s=0.05), TinyServable("m", "1", delay_s=0.05)
    engine = Engine()
    engine.add([a, b], BatcherConfig(max_batch_size=2, instances=2))
    futures = [engine.submit("m", None, InferRequest(str(i), _inputs(1, i))) for i in range(12)]
    for f in futures:
        f.result(10)
    engine.shutdown()
    assert a.batch_sizes_seen and b.batch_sizes_seen


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"max_queue_delay_us": -1}, "max_queue_delay_us"),
        ({"preferred_batch_sizes": (128,)}, "preferred_batch_sizes"),
        ({"max_batch_size": 8, "pad_batch_sizes": (2, 4)}, "must include max_batch_size"),
        ({"max_queue_size": 0}, "max_queue_size"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"instances": 0}, "instances"),
    ],
)
def test_batcher_config_checks_its_bounds(kwargs: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        BatcherConfig(**kwargs)


def test_config_from_hints_keeps_capture_sizes_and_server_overrides_win() -> None:
    hints = BatchingHints(max_batch_size=64, pad_to_batch_sizes=True, batch_sizes=(1, 8, 32))
    assert BatcherConfig.from_hints(hints).pad_batch_sizes == (1, 8, 32)
    assert BatcherConfig.from_hints(hints).max_batch_size == 32
    capped = BatcherConfig.from_hints(hints, max_batch_size=16)
    assert capped.max_batch_size == 16 and capped.pad_batch_sizes == (1, 8, 16)
