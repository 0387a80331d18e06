"""Reusable host buffers that batches are assembled in, one set per worker.

A fresh 77 MB array per ResNet batch costs page faults on every batch, and pageable memory halves the speed
of the copy to the GPU. So each worker keeps one buffer per input, sized for its largest batch, page-locked
when its model runs on CUDA, and concatenates requests straight into it. The buffer is reused by the next
batch, so `predict` must not keep its inputs past the call; outputs that alias an input are copied.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

log = logging.getLogger(__name__)


class StagingBuffers:
    def __init__(self, max_rows: int, pinned: bool) -> None:
        self._max_rows = max_rows
        self._pinned = pinned
        self._buffers: dict[str, np.ndarray] = {}

    def take(self, name: str, like: np.ndarray, rows: int) -> np.ndarray:
        """A writable, contiguous `rows`-row view shaped and typed like `like` beyond dim 0."""
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != like.dtype or buf.shape[1:] != like.shape[1:] or buf.shape[0] < rows:
            buf = self._allocate((max(rows, self._max_rows), *like.shape[1:]), like.dtype)
            self._buffers[name] = buf
        return buf[:rows]

    def detach(self, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy any output that shares memory with a staging buffer (a model that returns its input)."""
        return {
            k: v.copy() if any(np.may_share_memory(v, b) for b in self._buffers.values()) else v
            for k, v in outputs.items()
        }

    def _allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        if self._pinned and dtype.kind != "O":  # BYTES stay in pageable memory: torch cannot hold them
            torch = sys.modules.get("torch")
            try:
                empty = torch.from_numpy(np.empty(0, dtype=dtype))  # type: ignore[union-attr]
                return torch.empty(shape, dtype=empty.dtype, pin_memory=True).numpy()  # type: ignore[union-attr]
            except Exception:  # no CUDA after all, or a dtype torch lacks: pageable memory still works
                log.warning("could not page-lock a %s %s staging buffer; using pageable memory", shape, dtype)
                self._pinned = False
        return np.empty(shape, dtype=dtype)


def wants_pinned(device: str) -> bool:
    """Page-lock only where the model runs on CUDA and torch is already loaded (never import it here)."""
    torch = sys.modules.get("torch")
    return device.startswith("cuda") and torch is not None and bool(torch.cuda.is_available())
