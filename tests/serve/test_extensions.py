"""Statistics, BF16 and BYTES, and the plain ASGI infer path: `tritonclient.http` against the real server."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator

import httpx
import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from inferforge.errors import InferforgeError
from inferforge.serve.loadtest import LoadTestConfig, run

from .conftest import Server, start_server
from .tiny import write


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """tiny versions 1 and 2, types (BF16 and BYTES); a body limit above the protocol's 4 MiB step."""
    tmp = tmp_path_factory.mktemp("extensions")
    for version in ("1", "2"):
        (write(tmp / "repo" / "tiny" / version, seed=int(version)) / "manifest.json").write_text("{}")
    (write(tmp / "repo" / "types" / "1", kind="types") / "manifest.json").write_text("{}")
    server = start_server(tmp / "repo", tmp, "--version-policy", "all", "--max-body-mib", "16")
    yield server
    server.stop()


def _input(x: np.ndarray) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=True)
    return tensor


def test_statistics_count_requests_rows_batches_and_failures(server: Server) -> None:
    client = httpclient.InferenceServerClient(server.address)
    rows = [1, 3, 2, 5]
    for i, n in enumerate(rows):
        x = np.random.default_rng(i).standard_normal((n, 8)).astype(np.float32)
        client.infer("tiny", [_input(x)], model_version="1")
    with pytest.raises(InferenceServerException):  # wrong inner dimension: a failure of version 1
        client.infer("tiny", [_input(np.zeros((1, 7), np.float32))], model_version="1")

    stats = client.get_inference_statistics("tiny", "1")["model_stats"]
    assert [(s["name"], s["version"]) for s in stats] == [("tiny", "1")]
    s = stats[0]
    inference = s["inference_stats"]
    assert inference["success"]["count"] == len(rows) and inference["fail"]["count"] == 1
    assert s["inference_count"] == sum(rows)  # rows, not requests
    assert inference["queue"]["count"] == len(rows)
    executions = sum(b["compute_infer"]["count"] for b in s["batch_stats"])
    assert executions == s["execution_count"] >= 1
    assert sum(b["batch_size"] * b["compute_infer"]["count"] for b in s["batch_stats"]) == sum(rows)
    for phase in ("success", "compute_input", "compute_infer", "compute_output"):
        assert inference[phase]["ns"] > 0, phase
    # A request's time in the server covers its compute.
    assert inference["success"]["ns"] >= inference["compute_infer"]["ns"]
    assert s["last_inference"] > 1_600_000_000_000  # wall-clock milliseconds

    both = client.get_inference_statistics("tiny")["model_stats"]
    assert [s["version"] for s in both] == ["1", "2"]
    assert both[1]["inference_count"] == 0
    everything = client.get_inference_statistics()["model_stats"]
    assert {(s["name"], s["version"]) for s in everything} == {("tiny", "1"), ("tiny", "2"), ("types", "1")}
    assert "statistics" in client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException) as info:
        client.get_inference_statistics("nope")
    assert info.value.status() == "404"


def test_infer_route_keeps_the_protocol_edges(server: Server) -> None:
    url = server.url + "/v2/models/tiny/infer"
    wrong = httpx.get(url)
    assert wrong.status_code == 405 and "POST" in wrong.json()["error"]
    assert httpx.post(server.url + "/v2/models//infer", content=b"{}").status_code == 404
    assert httpx.post(server.url + "/v2/models/tiny/versions/9/infer", content=b"{}").status_code == 404
    body = httpx.post(url, content=b"not json").json()
    assert "malformed" in body["error"]


def test_a_body_larger_than_one_collection_step_arrives_whole(server: Server) -> None:
    client = httpclient.InferenceServerClient(server.address)
    x = np.random.default_rng(7).standard_normal((16, 8)).astype(np.float32)
    expected = client.infer("tiny", [_input(x)]).as_numpy("logits")
    # 6 MB of a second input name would be refused by name; pad the JSON header instead, which the server
    # must read in full (past the protocol's 4 MiB step) to find where the binary tensor starts.
    header = b'{"id":"' + b"x" * (6 * 1024 * 1024) + b'","inputs":[{"name":"input","datatype":"FP32",'
    header += b'"shape":[16,8],"parameters":{"binary_data_size":512}}],'
    header += b'"outputs":[{"name":"logits","parameters":{"binary_data":true}}]}'
    response = httpx.post(
        server.url + "/v2/models/tiny/infer",
        content=header + x.tobytes(),
        headers={"Inference-Header-Content-Length": str(len(header))},
        timeout=30,
    )
    assert response.status_code == 200, response.text[:300]
    json_len = int(response.headers["inference-header-content-length"])
    got = np.frombuffer(response.content[json_len:], dtype=np.float32).reshape(16, 4)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _types_inputs(x: np.ndarray, text: np.ndarray, binary: bool) -> list[httpclient.InferInput]:
    a = httpclient.InferInput("x", list(x.shape), "BF16")
    a.set_data_from_numpy(x, binary_data=True)  # BF16 only travels in binary
    b = httpclient.InferInput("text", list(text.shape), "BYTES")
    b.set_data_from_numpy(text, binary_data=binary)
    return [a, b]


@pytest.mark.parametrize("binary", [True, False])
def test_bf16_and_bytes_round_trip_through_tritonclient(server: Server, binary: bool) -> None:
    bf16 = ml_dtypes.bfloat16
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(bf16)
    text = np.array([b"abc", "h\u00e9llo w\u00f6rld".encode(), b""], dtype=object)
    outputs = [
        httpclient.InferRequestedOutput("x_plus_one", binary_data=True),
        httpclient.InferRequestedOutput("x_sum", binary_data=binary),
        httpclient.InferRequestedOutput("upper", binary_data=binary),
        httpclient.InferRequestedOutput("length", binary_data=binary),
    ]
    client = httpclient.InferenceServerClient(server.address)
    result = client.infer("types", _types_inputs(x, text, binary), outputs=outputs)
    expected_plus = (x.astype(np.float32) + 1).astype(bf16)  # bf16 + 1, rounded to bf16, like torch
    np.testing.assert_array_equal(
        result.as_numpy("x_plus_one").view(np.uint16), expected_plus.view(np.uint16)
    )
    np.testing.assert_allclose(result.as_numpy("x_sum"), x.astype(np.float32).sum(axis=1), rtol=1e-6)
    got = [t if isinstance(t, bytes) else t.encode() for t in result.as_numpy("upper")]
    assert got == [t.upper() for t in text]
    np.testing.assert_array_equal(result.as_numpy("length"), [len(t) for t in text])
    meta = client.get_model_metadata("types")
    assert [i["datatype"] for i in meta["inputs"]] == ["BF16", "BYTES"]
    assert client.get_model_config("types")["input"][1]["data_type"] == "TYPE_STRING"


def _raw(server: Server, doc: dict, tail: bytes = b"") -> httpx.Response:
    header = json.dumps(doc).encode()
    return httpx.post(
        server.url + "/v2/models/types/infer",
        content=header + tail,
        headers={"Inference-Header-Content-Length": str(len(header))} if tail else {},
    )


def test_bf16_and_bytes_are_checked_with_clear_400s(server: Server) -> None:
    x_bits = np.zeros((1, 4), np.uint16).tobytes()
    x_bin = {"name": "x", "datatype": "BF16", "shape": [1, 4], "parameters": {"binary_data_size": 8}}

    def text(size: int) -> dict:
        return {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}

    ok = _raw(server, {"inputs": [x_bin, text(7)]}, x_bits + struct.pack("<I", 3) + b"abc")
    assert ok.status_code == 200, ok.text
    assert (
        json.loads(ok.content[: int(ok.headers["inference-header-content-length"])])["outputs"][0][
            "parameters"
        ]["binary_data_size"]
        == 8
    )  # unnamed BF16 outputs come back binary
    cases = {
        "BF16 in JSON": (
            {"inputs": [{"name": "x", "datatype": "BF16", "shape": [1, 4], "data": [1, 2, 3, 4]}]},
            b"",
            "binary",
        ),
        "length past the end": (
            {"inputs": [x_bin, text(7)]},
            x_bits + struct.pack("<I", 9) + b"abc",
            "declares 9 bytes",
        ),
        "bytes left over": ({"inputs": [x_bin, text(8)]}, x_bits + struct.pack("<I", 3) + b"abcd", "use 7"),
        "no length prefix": ({"inputs": [x_bin, text(2)]}, x_bits + b"ab", "length prefix"),
        "non-string JSON": (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", 3]}]},
            b"",
            "must be strings",
        ),
        "element count": (
            {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [3], "data": ["a", "b"]}]},
            b"",
            "needs 3",
        ),
        "too many elements": (
            {"inputs": [x_bin, {**text(4), "shape": [10**9]}]},
            x_bits + struct.pack("<I", 0),
            "over the server's limit",
        ),
        "FP32 for BYTES": (
            {"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
            b"",
            "expects BYTES",
        ),
    }
    for label, (doc, tail, words) in cases.items():
        response = _raw(server, doc, tail)
        assert response.status_code == 400, (label, response.text)
        assert words in response.json()["error"], (label, response.json())
    as_json = {
        "inputs": [x_bin, text(7)],
        "outputs": [{"name": "x_plus_one", "parameters": {"binary_data": False}}],
    }
    response = _raw(server, as_json, x_bits + struct.pack("<I", 3) + b"abc")
    assert response.status_code == 400 and "binary" in response.json()["error"]


def test_loadtest_refuses_a_datatype_it_cannot_make_up(server: Server) -> None:
    with pytest.raises(InferforgeError, match="'text' is BYTES"):
        run(LoadTestConfig(url=server.url, model="types", duration=1.0))
