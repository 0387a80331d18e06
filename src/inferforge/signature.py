"""Named, typed tensors: the signature every stage agrees on, from the loaded model to the V2 server.

It sits below every stage so that `models` can describe inputs and `serve` can validate requests with one
type. Datatype names are the KServe V2 / Triton ones; shapes put the batch first and mark varying dimensions
with -1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

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
    DATATYPES: ClassVar[dict[str, np.dtype]] = (
        V2_TO_NUMPY  # the datatypes this spec admits (a subclass widens it)
    )

    def __post_init__(self) -> None:
        if self.datatype not in self.DATATYPES:
            raise ValueError(f"TensorSpec {self.name!r}: unknown datatype {self.datatype!r}")

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.DATATYPES[self.datatype]

    def fits(self, shape: tuple[int, ...]) -> bool:
        """True when a concrete shape matches this spec (same rank, fixed dimensions equal)."""
        return len(shape) == len(self.shape) and all(
            s == -1 or s == d for s, d in zip(self.shape, shape, strict=True)
        )

    def to_json(self) -> dict:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    @classmethod
    def from_json(cls, data: dict) -> TensorSpec:
        return cls(name=data["name"], datatype=data["datatype"], shape=tuple(int(d) for d in data["shape"]))

    @classmethod
    def from_array(cls, name: str, array: np.ndarray, *, variable_dims: tuple[int, ...] = (0,)) -> TensorSpec:
        """A spec for tensors shaped like `array`, with the batch (and any named dims) left variable."""
        shape = tuple(-1 if i in variable_dims else int(d) for i, d in enumerate(array.shape))
        return cls(name=name, datatype=NUMPY_TO_V2[np.dtype(array.dtype)], shape=shape)
