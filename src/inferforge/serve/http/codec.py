"""The V2 inference body, both ways: JSON tensors and the binary tensor data extension.

Every size the client declares is checked before anything is allocated: a declared shape must match the data
it came with exactly, and binary sizes must add up to the bytes after the JSON header, no more and no less."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from inferforge.registry.servable import NUMPY_TO_V2, TensorSpec
from inferforge.serve import datatypes as dt
from inferforge.serve.engine import InvalidRequest
from inferforge.serve.shm import SharedMemoryRegions

HEADER_LENGTH = "inference-header-content-length"


@dataclass(frozen=True)
class OutputRequest:
    name: str
    binary: bool
    shm: tuple[str, int, object] | None = None  # (region, byte_size, offset): write it there, not in the body


@dataclass(frozen=True)
class DecodedRequest:
    id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[OutputRequest, ...] | None
    binary_default: bool
    timeout_us: int | None


def _as_dict(value: object, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest(f"{what} must be a JSON object")
    return value


def decode_request(
    body: bytes,
    header_length: str | None,
    specs: dict[str, TensorSpec],
    shm: SharedMemoryRegions | None = None,
) -> DecodedRequest:
    """Parse and check one infer body against the model's declared inputs (names and datatypes)."""
    if header_length is None:
        json_end = len(body)
    else:
        if not header_length.strip().isdigit() or int(header_length) > len(body):
            raise InvalidRequest(
                f"Inference-Header-Content-Length {header_length!r} must be a whole number within the body "
                f"({len(body)} bytes)"
            )
        json_end = int(header_length)
    try:
        doc = json.loads(body[:json_end])
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"the request's JSON header is malformed: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("inputs"), list) or not doc["inputs"]:
        raise InvalidRequest('the request must be a JSON object with a non-empty "inputs" list')
    params = _as_dict(doc.get("parameters"), '"parameters"')
    binary = memoryview(body)[json_end:]
    offset = 0
    inputs: dict[str, np.ndarray] = {}
    for item in doc["inputs"]:
        arr, used = _decode_input(item, specs, binary, offset, shm)
        if arr is None:
            continue
        offset += used
        inputs[item["name"]] = arr
    if offset != len(binary):
        raise InvalidRequest(
            f"the binary tensor data is {len(binary)} bytes but the inputs' binary_data_size sum to {offset}"
        )
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout <= 0):
        raise InvalidRequest(
            f'parameter "timeout" must be a positive number of microseconds, got {timeout!r}'
        )
    request_id = doc.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidRequest(f'"id" must be a string, got {request_id!r}')
    return DecodedRequest(
        id=request_id,
        inputs=inputs,
        outputs=_decode_outputs(doc.get("outputs")),
        binary_default=bool(params.get("binary_data_output", False)),
        timeout_us=timeout,
    )


def _decode_input(
    item: object,
    specs: dict[str, TensorSpec],
    binary: memoryview,
    offset: int,
    shm: SharedMemoryRegions | None = None,
) -> tuple[np.ndarray | None, int]:
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        raise InvalidRequest('every entry of "inputs" must be an object with a string "name"')
    name = item["name"]
    spec = specs.get(name)
    if spec is None:
        raise InvalidRequest(f"input {name!r} is not an input of this model; its inputs are {sorted(specs)}")
    datatype, shape = item.get("datatype"), item.get("shape")
    if datatype != spec.datatype:
        known = "" if datatype in dt.WIRE_TO_NUMPY else f" (known datatypes: {sorted(dt.WIRE_TO_NUMPY)})"
        raise InvalidRequest(
            f"input {name!r} has datatype {datatype!r}, the model expects {spec.datatype}{known}"
        )
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise InvalidRequest(f"input {name!r}: shape must be a list of non-negative integers, got {shape!r}")
    dtype = dt.wire_dtype(spec)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    p = _as_dict(item.get("parameters"), f'input {name!r} "parameters"')
    if "shared_memory_region" in p:
        return _shm_input(name, shape, dtype, nbytes, p, shm), 0
    if "binary_data_size" in p and datatype == "BYTES":
        return _decode_bytes_input(name, shape, p["binary_data_size"], binary, offset)
    if "binary_data_size" in p:
        size = p["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidRequest(
                f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}"
            )
        if size != nbytes:
            raise InvalidRequest(
                f"input {name!r}: binary_data_size is {size} bytes but shape {shape} needs {nbytes}"
            )
        if offset + size > len(binary):
            raise InvalidRequest(
                f"input {name!r}: binary_data_size {size} runs past the end of the body "
                f"({len(binary) - offset} bytes left)"
            )
        arr = np.frombuffer(binary, dtype=dtype, count=count, offset=offset).reshape(shape)
        return arr, size
    if "data" not in item:
        raise InvalidRequest(f'input {name!r} has neither "data" nor a binary_data_size parameter')
    if datatype in dt.BINARY_ONLY:
        raise InvalidRequest(f"input {name!r}: {datatype} travels only in the binary tensor extension")
    if datatype == "BYTES":
        return dt.bytes_from_json(name, item["data"], count).reshape(shape), 0
    try:
        arr = np.asarray(item["data"], dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidRequest(f"input {name!r}: data cannot be read as {datatype}: {exc}") from None
    if arr.size != count:
        raise InvalidRequest(f"input {name!r}: data has {arr.size} elements but shape {shape} needs {count}")
    return arr.reshape(shape), 0


def _shm_input(
    name: str, shape: list[int], dtype: np.dtype, nbytes: int, p: dict, shm: SharedMemoryRegions | None
) -> np.ndarray:
    if shm is None:
        raise InvalidRequest(
            f"input {name!r} names a shared memory region, but the extension is off: start the server with "
            "--enable-shared-memory"
        )
    size = p.get("shared_memory_byte_size")
    if dtype == np.dtype(object):
        raise InvalidRequest(
            f"input {name!r}: BYTES inputs are not read from shared memory; send them inline"
        )
    if size != nbytes:
        raise InvalidRequest(
            f"input {name!r}: shared_memory_byte_size is {size!r} but shape {shape} needs {nbytes}"
        )
    raw = shm.read(name, p["shared_memory_region"], p.get("shared_memory_offset"), nbytes)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _decode_bytes_input(
    name: str, shape: list[int], size: object, binary: memoryview, offset: int
) -> tuple[np.ndarray, int]:
    """BYTES elements carry their own lengths, so binary_data_size only bounds them."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidRequest(f"input {name!r}: binary_data_size must be a non-negative integer, got {size!r}")
    if offset + size > len(binary):
        raise InvalidRequest(
            f"input {name!r}: binary_data_size {size} runs past the end of the body "
            f"({len(binary) - offset} bytes left)"
        )
    arr = dt.decode_bytes(name, binary[offset : offset + size], math.prod(shape))
    return arr.reshape(shape), size


def _decode_outputs(outputs: object) -> tuple[OutputRequest, ...] | None:
    if outputs is None:
        return None
    if not isinstance(outputs, list):
        raise InvalidRequest('"outputs" must be a list of {"name": ...} objects')
    wanted: list[OutputRequest] = []
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidRequest('every entry of "outputs" must be an object with a string "name"')
        p = _as_dict(item.get("parameters"), f'output {item["name"]!r} "parameters"')
        if "classification" in p:
            raise InvalidRequest(f"output {item['name']!r}: the classification extension is not supported")
        region = None
        if "shared_memory_region" in p:
            size = p.get("shared_memory_byte_size")
            if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
                raise InvalidRequest(
                    f"output {item['name']!r}: shared_memory_byte_size must be a positive integer, "
                    f"got {size!r}"
                )
            region = (p["shared_memory_region"], size, p.get("shared_memory_offset"))
        wanted.append(OutputRequest(item["name"], bool(p.get("binary_data", False)), region))
    return tuple(wanted)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str,
    outputs: dict[str, np.ndarray],
    binary: dict[str, bool],
    datatypes: dict[str, str] | None = None,
    shm_out: dict[str, tuple[str, int, object]] | None = None,
    shm: SharedMemoryRegions | None = None,
) -> tuple[bytes, int | None]:
    """The body and, when any output is binary, the JSON header's length (Inference-Header-Content-Length).
    `datatypes`: the outputs' declared V2 datatypes (needed for BF16 and BYTES; else read off the arrays).
    `shm_out`: outputs to write into shared memory regions (region, byte_size, offset) instead."""
    entries: list[dict] = []
    chunks: list[bytes] = []
    declared = datatypes or {}
    for name, arr in outputs.items():
        datatype = declared.get(name) or NUMPY_TO_V2[arr.dtype]
        entry: dict = {"name": name, "datatype": datatype, "shape": list(arr.shape)}
        if shm_out and name in shm_out:
            region, size, offset = shm_out[name]
            raw = _output_bytes(name, datatype, arr)
            if shm is None:
                raise InvalidRequest(
                    f"output {name!r}: the shared memory extension is off (--enable-shared-memory)"
                )
            if len(raw) > size:
                raise InvalidRequest(
                    f"output {name!r} is {len(raw)} bytes, more than its shared_memory_byte_size {size}"
                )
            shm.write(name, region, offset, raw)
            entry["parameters"] = {"shared_memory_region": region, "shared_memory_byte_size": len(raw)}
        elif binary.get(name, False):
            raw = _output_bytes(name, datatype, arr)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif datatype in dt.BINARY_ONLY:
            raise InvalidRequest(
                f'output {name!r} is {datatype}, which travels only in binary: ask with "binary_data": true'
            )
        elif datatype == "BYTES":
            entry["data"] = dt.bytes_to_json(name, arr)
        else:
            entry["data"] = arr.reshape(-1).tolist()
        entries.append(entry)
    doc: dict = {"model_name": model_name, "model_version": model_version, "outputs": entries}
    if request_id:
        doc["id"] = request_id
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _output_bytes(name: str, datatype: str, arr: np.ndarray) -> bytes:
    if datatype == "BYTES":
        return dt.encode_bytes(name, arr)
    if datatype == "BF16":
        arr = dt.bf16_bits(name, arr)
    return np.ascontiguousarray(arr).tobytes()
