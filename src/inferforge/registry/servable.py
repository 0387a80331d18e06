"""What a server needs to know of a model, whatever produced it: named, typed tensors in and out, and
`predict`.

This is the contract between `registry` (which loads artifacts) and `serve` (which batches and speaks
protocols). Shapes put the batch first; -1 marks a dimension that varies between requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

from inferforge.signature import NUMPY_TO_V2, V2_TO_NUMPY, TensorSpec

__all__ = ["NUMPY_TO_V2", "V2_TO_NUMPY", "BatchingHints", "Servable", "TensorSpec"]


@dataclass(frozen=True)
class BatchingHints:
    """What the artifact knows about batching it well (the server's config may override it)."""

    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = ()
    pad_to_batch_sizes: bool = False  # True when the variant runs CUDA graphs captured at these sizes only
    batch_sizes: tuple[int, ...] = field(default_factory=tuple)


@runtime_checkable
class Servable(Protocol):
    """A loaded model ready to answer batches. `predict` is called from one worker thread at a time."""

    name: str
    version: str
    platform: str  # e.g. "pytorch", "onnxruntime"
    device: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingHints

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch: every input has the batch on dim 0; every output comes back with the same batch
        size."""
        ...

    def close(self) -> None:
        """Free device memory held by the model."""
        ...
