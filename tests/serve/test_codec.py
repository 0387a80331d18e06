"""The V2 body codec against bodies built and parsed by the official tritonclient, and lying bodies."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as httpclient

from inferforge.registry.servable import TensorSpec
from inferforge.serve.engine import InvalidRequest
from inferforge.serve.http.codec import decode_request, encode_response

SPECS = {"input": TensorSpec("input", "FP32", (-1, 8)), "mask": TensorSpec("mask", "BOOL", (-1, 8))}


def _client_body(binary: bool, outputs=None, **kwargs):  # type: ignore[no-untyped-def]
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    m = np.random.default_rng(1).random((3, 8)) > 0.5
    a = httpclient.InferInput("input", [3, 8], "FP32")
    a.set_data_from_numpy(x, binary_data=binary)
    b = httpclient.InferInput("mask", [3, 8], "BOOL")
    b.set_data_from_numpy(m, binary_data=not binary)  # one of each encoding in the same body
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [a, b], outputs=outputs, **kwargs
    )
    return body, json_size, x, m


@pytest.mark.parametrize("binary", [True, False])
def test_decodes_what_tritonclient_encodes(binary: bool) -> None:
    body, json_size, x, m = _client_body(binary, request_id="r-1", timeout=1500)
    decoded = decode_request(body, None if json_size is None else str(json_size), SPECS)
    np.testing.assert_array_equal(decoded.inputs["input"], x)
    np.testing.assert_array_equal(decoded.inputs["mask"], m)
    assert decoded.id == "r-1" and decoded.timeout_us == 1500
    assert decoded.outputs is None and decoded.binary_default  # no outputs named: the client asks for binary


def test_output_selection_and_binary_flags_round_trip_through_tritonclient() -> None:
    wanted = [
        httpclient.InferRequestedOutput("logits", binary_data=True),
        httpclient.InferRequestedOutput("label", binary_data=False),
    ]
    body, json_size, _, _ = _client_body(True, outputs=wanted)
    decoded = decode_request(body, str(json_size), SPECS)
    assert [(o.name, o.binary) for o in decoded.outputs or ()] == [("logits", True), ("label", False)]
    logits = np.arange(12, dtype=np.float32).reshape(3, 4)
    label = np.array([3, 1, 2], dtype=np.int64)
    payload, header_len = encode_response(
        "m", "2", "r-1", {"logits": logits, "label": label}, {"logits": True, "label": False}
    )
    result = httpclient.InferenceServerClient.parse_response_body(payload, header_length=header_len)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    np.testing.assert_array_equal(result.as_numpy("label"), label)
    assert result.get_response()["model_version"] == "2" and result.get_response()["id"] == "r-1"


def _binary_body(size_field: int, payload_bytes: int, shape=(1, 8)) -> tuple[bytes, str]:  # type: ignore[no-untyped-def]
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": list(shape),
                    "parameters": {"binary_data_size": size_field},
                },
                {"name": "mask", "datatype": "BOOL", "shape": [1, 8], "data": [True] * 8},
            ]
        }
    ).encode()
    return header + b"\0" * payload_bytes, str(len(header))


@pytest.mark.parametrize(
    ("body_and_header", "fragment"),
    [
        (_binary_body(32, 32), None),
        (_binary_body(31, 31), "binary_data_size is 31 bytes but shape"),
        (_binary_body(32, 16), "runs past the end of the body"),
        (_binary_body(32, 40), "binary tensor data is 40 bytes"),
        (_binary_body(32, 32, shape=(1 << 40, 1 << 40)), "binary_data_size is 32 bytes"),
        ((b'{"inputs": [', "12"), "malformed"),
        ((b'{"inputs": []}', "999"), "Inference-Header-Content-Length '999'"),
        ((b'{"inputs": []}', "-1"), "Inference-Header-Content-Length '-1'"),
        ((b"[1, 2]", None), 'non-empty "inputs"'),
        ((b"\xff\xfe", None), "malformed"),
    ],
)
def test_lying_or_malformed_bodies_are_refused_before_allocating(body_and_header, fragment) -> None:  # type: ignore[no-untyped-def]
    body, header = body_and_header
    if fragment is None:
        assert decode_request(body, header, SPECS).inputs["input"].shape == (1, 8)
        return
    with pytest.raises(InvalidRequest, match=fragment):
        decode_request(body, header, SPECS)


@pytest.mark.parametrize(
    ("entry", "fragment"),
    [
        (
            {"name": "image", "datatype": "FP32", "shape": [1, 8], "data": [0] * 8},
            "input 'image' is not an input",
        ),
        (
            {"name": "input", "datatype": "FP64", "shape": [1, 8], "data": [0] * 8},
            "input 'input' has datatype 'FP64'",
        ),
        ({"name": "input", "datatype": "FP32", "shape": [1, -8], "data": [0] * 8}, "non-negative integers"),
        (
            {"name": "input", "datatype": "FP32", "shape": [10**9, 10**9], "data": [0] * 8},
            "needs 1000000000000000000",
        ),
        ({"name": "input", "datatype": "FP32", "shape": [1, 8], "data": ["a"] * 8}, "cannot be read as FP32"),
        ({"name": "input", "datatype": "FP32", "shape": [1, 8]}, 'neither "data"'),
        ({"name": 3, "datatype": "FP32", "shape": [1, 8]}, 'string "name"'),
    ],
)
def test_json_tensor_errors_name_the_tensor(entry: dict, fragment: str) -> None:
    body = json.dumps({"inputs": [entry]}).encode()
    with pytest.raises(InvalidRequest, match=fragment.replace("(", r"\(")):
        decode_request(body, None, SPECS)
