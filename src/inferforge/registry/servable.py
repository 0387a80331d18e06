"""What a server needs to know of a model, whatever produced it: named, typed tensors in and out, and `predict`.

This is the contract between `registry` (which loads artifacts) and `serve` (which batches and speaks protocols).
Shapes put the batch first; -1 marks a dimension that varies between requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np

# KServe V2 / Triton datatype names and the numpy dtypes they travel as.
V2_TO_NUMPY: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}
NUMPY_TO_V2: dict[np.dtype, str] = {v: k for k, v in V2_TO_NUMPY.items()}


@dataclass(frozen=True)
class TensorSpec:
    """One named tensor of a model's signature."""

    name: str
    datatype: str  # a V2 datatype name: "FP32", "INT64", ...
    shape: tuple[int, ...]  # batch dimension first; -1 where a dimension varies

    def __post_init__(self) -> None:
        if self.datatype not in V2_TO_NUMPY:
            raise ValueError(f"TensorSpec {self.name!r}: unknown datatype {self.datatype!r}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return V2_TO_NUMPY[self.datatype]

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(name=data["name"], datatype=data["datatype"], shape=tuple(int(d) for d in data["shape"]))


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
        """Run one batch: every input has the batch on dim 0; every output comes back with the same batch size."""
        ...

    def close(self) -> None:
        """Free device memory held by the model."""
        ...
