"""The statistics extension and the plain ASGI infer path, through `tritonclient.http` and the real server."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import Server, start_server
from .tiny import write


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """tiny versions 1 and 2; a body limit above the protocol's 4 MiB collection step."""
    tmp = tmp_path_factory.mktemp("extensions")
    for version in ("1", "2"):
        (write(tmp / "repo" / "tiny" / version, seed=int(version)) / "manifest.json").write_text("{}")
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
    assert {(s["name"], s["version"]) for s in everything} == {("tiny", "1"), ("tiny", "2")}
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
