"""The two V2 datatypes numpy cannot hold as they travel: BF16 and BYTES.

BF16: numpy has no bfloat16, so a BF16 tensor is carried through the server as `np.uint16` holding the
bfloat16 bit patterns, the bytes exactly as they came. A servable receives that array and views it without a
copy: `torch.from_numpy(x).view(torch.bfloat16)`; a BF16 output is returned the same way
(`t.view(torch.int16).numpy().view(np.uint16)`). As in Triton, BF16 travels only in the binary extension (JSON
has no bfloat16 numbers); a JSON BF16 input or output is refused with a 400.

BYTES: each element is a byte string, carried as a numpy object array of `bytes`. In the binary extension
every element is a 4-byte little-endian length and then its bytes; in JSON the elements are strings (UTF-8).

`TensorSpec` (below every stage) names only the numeric datatypes, so a servable declares BF16 or BYTES
tensors with `ServeTensorSpec`, the same spec that also accepts these two."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from inferforge.serve.engine.errors import InvalidRequest, ModelExecutionError
from inferforge.signature import V2_TO_NUMPY, TensorSpec

WIRE_TO_NUMPY: dict[str, np.dtype] = {
    **V2_TO_NUMPY,
    "BF16": np.dtype(np.uint16),
    "BYTES": np.dtype(object),
}
BINARY_ONLY = frozenset({"BF16"})
MAX_BYTES_ELEMENTS = 1 << 18
"""Most elements of one BYTES tensor: each is parsed in Python on the event loop, so this bounds the time a
hostile body can take (a few tens of milliseconds)."""

_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class ServeTensorSpec(TensorSpec):
    """A `TensorSpec` that may also be BF16 or BYTES (see the module docstring for how they are carried)."""

    DATATYPES: ClassVar[dict[str, np.dtype]] = WIRE_TO_NUMPY


def wire_dtype(spec: TensorSpec) -> np.dtype:
    """The numpy dtype the server carries a tensor of this spec in."""
    return WIRE_TO_NUMPY[spec.datatype]


def decode_bytes(name: str, raw: memoryview, count: int) -> np.ndarray:
    """`count` length-prefixed elements that fill `raw` exactly, as a 1-D object array of bytes."""
    if count > MAX_BYTES_ELEMENTS:
        raise InvalidRequest(
            f"input {name!r}: {count} BYTES elements is over the server's limit of {MAX_BYTES_ELEMENTS}; "
            "split the request"
        )
    out = np.empty(count, dtype=object)
    offset, end = 0, len(raw)
    for i in range(count):
        if offset + 4 > end:
            raise InvalidRequest(
                f"input {name!r}: BYTES element {i} of {count} has no 4-byte length prefix "
                f"({end - offset} bytes left of binary_data_size {end})"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += 4
        if offset + length > end:
            raise InvalidRequest(
                f"input {name!r}: BYTES element {i} declares {length} bytes but only {end - offset} remain"
            )
        out[i] = bytes(raw[offset : offset + length])
        offset += length
    if offset != end:
        raise InvalidRequest(
            f"input {name!r}: {count} BYTES elements use {offset} bytes but binary_data_size is {end}"
        )
    return out


def bytes_from_json(name: str, data: object, count: int) -> np.ndarray:
    """JSON BYTES elements (strings, possibly nested lists) as a 1-D object array of UTF-8 bytes."""
    flat: list[bytes] = []

    def walk(item: object) -> None:
        if isinstance(item, list):
            for x in item:
                walk(x)
        elif isinstance(item, str):
            flat.append(item.encode("utf-8"))
        else:
            raise InvalidRequest(f"input {name!r}: BYTES data in JSON must be strings, got {item!r:.60}")
        if len(flat) > count:
            raise InvalidRequest(f"input {name!r}: data has more than the {count} elements its shape needs")

    walk(data)
    if len(flat) != count:
        raise InvalidRequest(f"input {name!r}: data has {len(flat)} elements but its shape needs {count}")
    out = np.empty(count, dtype=object)
    out[:] = flat
    return out


def _element_bytes(name: str, x: object) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode("utf-8")
    raise ModelExecutionError(
        f"output {name!r}: the model returned a BYTES element of type {type(x).__name__}, not bytes or str"
    )


def encode_bytes(name: str, arr: np.ndarray) -> bytes:
    """Length-prefixed elements in row-major order (the binary extension's BYTES layout)."""
    parts: list[bytes] = []
    for x in arr.reshape(-1):
        raw = _element_bytes(name, x)
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def bytes_to_json(name: str, arr: np.ndarray) -> list[str]:
    try:
        return [_element_bytes(name, x).decode("utf-8") for x in arr.reshape(-1)]
    except UnicodeDecodeError:
        raise InvalidRequest(
            f"output {name!r} holds bytes that are not UTF-8, which JSON cannot carry; ask for it with "
            '"binary_data": true'
        ) from None


def bf16_bits(name: str, arr: np.ndarray) -> np.ndarray:
    """A BF16 output as uint16 bits: servables return uint16 (or ml_dtypes' bfloat16, viewed as such)."""
    if arr.dtype == np.uint16:
        return arr
    if arr.dtype.name == "bfloat16" and arr.dtype.itemsize == 2:
        return arr.view(np.uint16)
    raise ModelExecutionError(
        f"output {name!r} is declared BF16 but the model returned {arr.dtype}; return its uint16 bits"
    )
