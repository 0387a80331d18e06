"""The dynamic batcher: a bounded queue per model version, and the rules that turn requests into batches.

Requests are grouped by their non-batch shape and dtype: only requests that agree on every dimension but the
first are concatenated (inner dimensions are never padded: that is only safe where a model declares it).
Within a group the order is first-in first-out. A batch closes when it holds `max_batch_size` rows, when the
oldest request has waited `max_queue_delay_us`, or, while waiting, as soon as its rows reach a preferred
batch size. With no delay the batcher takes whatever queued while the previous batch ran, which is what
saturating load needs.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

from inferforge.serve.engine.errors import DeadlineExceeded, Overloaded, ShuttingDown
from inferforge.serve.engine.staging import StagingBuffers
from inferforge.serve.engine.types import BatcherConfig, InferRequest, InferResponse


def shape_key(inputs: dict[str, np.ndarray]) -> tuple:
    """Requests with equal keys can share a batch: same names, dtypes and every dimension after the first."""
    return tuple((name, arr.dtype.str, arr.shape[1:]) for name, arr in sorted(inputs.items()))


@dataclass
class Pending:
    """A request waiting in the queue, with the future its caller awaits."""

    request: InferRequest
    future: Future[InferResponse] = field(default_factory=Future)
    key: tuple = ()
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return self.request.rows


class BatchQueue:
    """Thread-safe and bounded: producers never block, and a full queue refuses rather than grows."""

    def __init__(self, config: BatcherConfig, label: str) -> None:
        self._config = config
        self._label = label
        self._items: deque[Pending] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, request: InferRequest) -> Pending:
        pending = Pending(request=request, key=shape_key(request.inputs))
        with self._cond:
            if self._closed:
                raise ShuttingDown(
                    f"model {self._label} is unloading or the server is shutting down; retry later"
                )
            if len(self._items) >= self._config.max_queue_size:
                raise Overloaded(
                    f"model {self._label}: queue full ({self._config.max_queue_size} requests waiting); "
                    "retry later or raise --max-queue-size",
                    retry_after_s=1,
                )
            self._items.append(pending)
            self._cond.notify()
        return pending

    def close(self) -> None:
        """Refuse new requests; workers still drain what is queued, then see `None`."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def take_batch(self) -> list[Pending] | None:
        """Block until a batch is ready and return it; `None` once closed and empty."""
        cfg = self._config
        delay = cfg.max_queue_delay_us / 1e6
        with self._cond:
            while True:
                self._drop_dead()
                while not self._items:
                    if self._closed:
                        return None
                    self._cond.wait()
                    self._drop_dead()
                head = self._items[0]
                close_at = head.enqueued + delay
                while not self._closed:
                    rows = sum(p.rows for p in self._items if p.key == head.key)
                    remaining = close_at - time.monotonic()
                    if rows >= cfg.max_batch_size or remaining <= 0 or rows in cfg.preferred_batch_sizes:
                        break
                    self._cond.wait(remaining)
                batch = self._select(head.key)
                live = [p for p in batch if p.future.set_running_or_notify_cancel()]
                if live:
                    return live

    def _select(self, key: tuple) -> list[Pending]:
        """Pick FIFO requests of one shape group, up to max rows."""
        chosen: list[Pending] = []
        rows = 0
        for p in self._items:
            if p.key != key:
                continue
            if chosen and rows + p.rows > self._config.max_batch_size:
                break
            chosen.append(p)
            rows += p.rows
        taken = {id(p) for p in chosen}
        self._items = deque(p for p in self._items if id(p) not in taken)
        return chosen

    def _drop_dead(self) -> None:
        """Answer expired requests now and forget cancelled ones, so neither occupies a batch slot."""
        now = time.monotonic()
        keep: deque[Pending] = deque()
        for p in self._items:
            if p.future.cancelled():
                continue
            deadline = p.request.deadline
            if deadline is not None and now >= deadline:
                if p.future.set_running_or_notify_cancel():
                    p.future.set_exception(
                        DeadlineExceeded(
                            f"request {p.request.id!r} to {self._label} waited past its deadline"
                        )
                    )
                continue
            keep.append(p)
        self._items = keep


def pad_size(rows: int, sizes: tuple[int, ...]) -> int:
    """The smallest allowed size that holds `rows`, or `rows` when no sizes are fixed."""
    if not sizes:
        return rows
    return min(s for s in sizes if s >= rows)


def concat_inputs(batch: list[Pending], padded_rows: int, staging: StagingBuffers) -> dict[str, np.ndarray]:
    """One contiguous array per input, written into the worker's staging buffer; pad rows repeat the last real
    row (a valid input, unlike zeros for some models)."""
    out: dict[str, np.ndarray] = {}
    for name in batch[0].request.inputs:
        parts = [p.request.inputs[name] for p in batch]
        rows = sum(int(a.shape[0]) for a in parts)
        if padded_rows > rows:
            parts.append(np.repeat(parts[-1][-1:], padded_rows - rows, axis=0))
        target = staging.take(name, parts[0], padded_rows)
        np.concatenate(parts, axis=0, out=target)
        out[name] = target
    return out


def split_outputs(outputs: dict[str, np.ndarray], batch: list[Pending]) -> list[dict[str, np.ndarray]]:
    """Slice each output back into the rows of each request (views of the batch output, no copy)."""
    result: list[dict[str, np.ndarray]] = []
    start = 0
    for p in batch:
        stop = start + p.rows
        wanted = p.request.outputs if p.request.outputs is not None else tuple(outputs)
        result.append({name: outputs[name][start:stop] for name in wanted})
        start = stop
    return result
