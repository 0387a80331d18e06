"""One model version being served: its signature checks, its queue, and one worker thread per model instance.

Compute runs in these threads (torch releases the GIL during kernels), so an asyncio front end never blocks on
it."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Protocol

import numpy as np

from inferforge.registry.servable import Servable, TensorSpec
from inferforge.serve.engine.batcher import BatchQueue, Pending, concat_inputs, pad_size, split_outputs
from inferforge.serve.engine.errors import InvalidRequest, ModelExecutionError
from inferforge.serve.engine.staging import StagingBuffers, wants_pinned
from inferforge.serve.engine.stats import ModelStats
from inferforge.serve.engine.types import BatcherConfig, InferRequest, InferResponse

log = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Receives the engine's measurements (metrics implements it; no exporter is imported)."""

    def on_batch(
        self, model: str, version: str, rows: int, padded: int, compute_s: float, queue_s: Sequence[float]
    ) -> None: ...

    def on_queue_depth(self, model: str, version: str, depth: int) -> None: ...


class ModelRunner:
    """Validates requests against the servable's declared inputs and runs batches of them."""

    def __init__(
        self, instances: Sequence[Servable], config: BatcherConfig, observer: EngineObserver | None = None
    ) -> None:
        if not instances:
            raise ValueError("a ModelRunner needs at least one servable instance")
        self.servable = instances[0]
        self.name = self.servable.name
        self.version = str(self.servable.version)
        self.config = config
        self.input_specs: dict[str, TensorSpec] = {s.name: s for s in self.servable.inputs}
        self._output_names = frozenset(s.name for s in self.servable.outputs)
        self.output_datatypes: dict[str, str] = {s.name: s.datatype for s in self.servable.outputs}
        self.stats = ModelStats()
        self._instances = list(instances)
        self._observer = observer
        self._queue = BatchQueue(config, f"{self.name!r} version {self.version}")
        self._inflight = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(
                target=self._work, args=(inst,), name=f"serve-{self.name}-{self.version}-{i}", daemon=True
            )
            for i, inst in enumerate(self._instances)
        ]
        for t in self._threads:
            t.start()

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    def submit(self, request: InferRequest) -> Future[InferResponse]:
        """Validate and enqueue; raises `InvalidRequest`, `Overloaded` or `ShuttingDown` instead."""
        self.validate(request)
        if request.deadline is None:
            request.deadline = request.arrival + self.config.timeout_s
        pending = self._queue.put(request)
        self._report_depth()
        return pending.future

    def validate(self, request: InferRequest) -> None:
        specs = self.input_specs
        label = f"model {self.name!r}"
        for name in request.inputs:
            if name not in specs:
                raise InvalidRequest(f"{label} has no input {name!r}; its inputs are {sorted(specs)}")
        for name in specs:
            if name not in request.inputs:
                raise InvalidRequest(f"{label}: input {name!r} is missing from the request")
        rows: set[int] = set()
        for name, arr in request.inputs.items():
            _check_tensor(label, specs[name], arr)
            rows.add(int(arr.shape[0]))
        if len(rows) > 1:
            raise InvalidRequest(f"{label}: inputs disagree on the batch size (dim 0): {sorted(rows)}")
        n = rows.pop() if rows else 0
        if not 1 <= n <= self.config.max_batch_size:
            raise InvalidRequest(
                f"{label}: batch size {n} is outside 1..{self.config.max_batch_size} (the max batch size); "
                "split the request"
            )
        known = self._output_names
        for name in request.outputs or ():
            if name not in known:
                raise InvalidRequest(f"{label} has no output {name!r}; its outputs are {sorted(known)}")

    def close(self, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop taking requests, let the workers finish what is queued, then free the instances."""
        self._queue.close()
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()) if drain else 0.0)
        for inst in self._instances:
            try:
                inst.close()
            except Exception:  # closing must not stop the others from closing
                log.exception("closing %s version %s failed", self.name, self.version)

    def _work(self, servable: Servable) -> None:
        staging = StagingBuffers(self.config.max_batch_size, wants_pinned(str(servable.device)))
        while True:
            batch = self._queue.take_batch()
            if batch is None:
                return
            self._report_depth()
            self._run(servable, batch, staging)

    def _run(self, servable: Servable, batch: list[Pending], staging: StagingBuffers) -> None:
        start = time.monotonic()
        t0 = time.perf_counter_ns()
        queue_s = [start - p.enqueued for p in batch]
        rows = sum(p.rows for p in batch)
        padded = pad_size(rows, self.config.pad_batch_sizes)
        try:
            inputs = concat_inputs(batch, padded, staging)
            t1 = time.perf_counter_ns()
            raw = servable.predict(inputs)
            t2 = time.perf_counter_ns()
            outputs = staging.detach(raw)
            bad = {k: v.shape for k, v in outputs.items() if v.ndim == 0 or v.shape[0] != padded}
            if bad:
                raise RuntimeError(f"outputs {bad} do not have the batch size {padded} on dim 0")
            parts = split_outputs(outputs, batch)
        except Exception as exc:
            log.exception("model %s version %s failed on a batch of %d", self.name, self.version, rows)
            error = ModelExecutionError(f"model {self.name!r} version {self.version} failed: {exc}")
            for p in batch:
                p.future.set_exception(error)
            return
        t3 = time.perf_counter_ns()
        compute_s = (t3 - t0) / 1e9
        self.stats.record_batch(rows, [int(q * 1e9) for q in queue_s], t1 - t0, t2 - t1, t3 - t2)
        # Metrics first, answers last: setting a result wakes the event loop, which then needs the GIL this
        # thread would otherwise still hold for the observer.
        if self._observer is not None:
            self._observer.on_batch(self.name, self.version, rows, padded, compute_s, queue_s)
        for p, outs, q in zip(batch, parts, queue_s, strict=True):
            p.future.set_result(
                InferResponse(
                    id=p.request.id,
                    model_name=self.name,
                    model_version=self.version,
                    outputs=outs,
                    queue_s=q,
                    compute_s=compute_s,
                    batch_size=rows,
                )
            )

    def _report_depth(self) -> None:
        if self._observer is not None:
            self._observer.on_queue_depth(self.name, self.version, len(self._queue))


def _check_tensor(label: str, spec: TensorSpec, arr: np.ndarray) -> None:
    if arr.dtype != spec.numpy_dtype:
        raise InvalidRequest(
            f"{label}: input {spec.name!r} has datatype {arr.dtype}, expected {spec.datatype}"
        )
    if arr.ndim != len(spec.shape):
        raise InvalidRequest(
            f"{label}: input {spec.name!r} has shape {list(arr.shape)}, expected {len(spec.shape)} dims "
            f"like {list(spec.shape)} (batch first)"
        )
    for i, (got, want) in enumerate(zip(arr.shape, spec.shape, strict=True)):
        if i > 0 and want != -1 and got != want:
            raise InvalidRequest(
                f"{label}: input {spec.name!r} has shape {list(arr.shape)}, expected {list(spec.shape)} "
                f"(dimension {i} must be {want})"
            )
    if math.prod(arr.shape[1:]) == 0:
        raise InvalidRequest(
            f"{label}: input {spec.name!r} has an empty dimension in shape {list(arr.shape)}"
        )
