"""The V2 protocol through the official `tritonclient.http` against the real server on loopback."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import KEY, Server
from .tiny import TinyServable


def _input(x: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return tensor


def _x(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)


def _status(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(InferenceServerException) as info:
        call()
    return f"{info.value.status()} {info.value.message()}"


def test_health_metadata_config_and_index(open_server: Server) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    assert client.is_server_live() and client.is_server_ready()
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("tiny")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 8]}]
    assert [o["name"] for o in meta["outputs"]] == ["logits", "label"]
    assert client.is_model_ready("tiny", "1") and client.is_model_ready("tiny", "2")
    config = client.get_model_config("slow")
    assert config["max_batch_size"] == 4
    assert config["input"] == [{"name": "input", "data_type": "TYPE_FP32", "dims": [8]}]
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 2000
    index = client.get_model_repository_index()
    assert {(r["name"], r["version"], r["state"]) for r in index} == {
        ("slow", "1", "READY"),
        ("tiny", "1", "READY"),
        ("tiny", "2", "READY"),
    }


@pytest.mark.parametrize("binary", [True, False])
def test_infer_matches_the_model_and_routes_versions(open_server: Server, binary: bool) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    x = _x(3, 0)
    for version, seed in (("1", 1), ("2", 2)):
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("logits", "label")]
        result = client.infer(
            "tiny", [_input(x, binary)], model_version=version, outputs=outputs, request_id="r7"
        )
        expected = TinyServable("tiny", version, seed=seed).predict({"input": x})
        np.testing.assert_allclose(result.as_numpy("logits"), expected["logits"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(result.as_numpy("label"), expected["label"])
        response = result.get_response()
        assert response["id"] == "r7" and response["model_version"] == version
    latest = client.infer("tiny", [_input(x)])  # no version: the highest served
    assert latest.get_response()["model_version"] == "2"


def test_output_selection_returns_only_what_was_asked(open_server: Server) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    result = client.infer("tiny", [_input(_x(2, 1))], outputs=[httpclient.InferRequestedOutput("label")])
    assert [o["name"] for o in result.get_response()["outputs"]] == ["label"]
    assert result.as_numpy("logits") is None


def test_concurrent_requests_are_batched_and_each_answer_is_its_own(open_server: Server) -> None:
    reference = TinyServable("tiny", "2", seed=2)
    inputs = [_x(1 + i % 4, 100 + i) for i in range(48)]

    def call(x: np.ndarray) -> np.ndarray:
        client = httpclient.InferenceServerClient(open_server.address)
        return client.infer("tiny", [_input(x)], model_version="2").as_numpy("logits")

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, inputs))
    for x, got in zip(inputs, answers, strict=True):
        np.testing.assert_allclose(got, reference.predict({"input": x})["logits"], rtol=1e-5, atol=1e-6)
    metrics = httpx.get(open_server.url + "/metrics").text
    batches = _histogram(metrics, "inferforge_batch_size", 'model="tiny",version="2"')
    assert batches["count"] < 48 and batches["sum"] >= sum(x.shape[0] for x in inputs), (
        "no request was batched"
    )


def _histogram(text: str, name: str, labels: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        for part in ("count", "sum"):
            if line.startswith(f"{name}_{part}{{") and labels in line:
                out[part] = float(line.rsplit(" ", 1)[1])
    return out


def test_errors_have_the_v2_shape_and_status(open_server: Server) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    assert _status(lambda: client.infer("tiny", [_input(_x(1, 0)[:, :7])])).startswith("400")
    assert "input 'input'" in _status(lambda: client.infer("tiny", [_input(_x(1, 0)[:, :7])]))
    wrong = httpclient.InferInput("input", [1, 8], "FP64")
    wrong.set_data_from_numpy(np.zeros((1, 8)))
    assert "400" in _status(lambda: client.infer("tiny", [wrong])) and "FP64" in _status(
        lambda: client.infer("tiny", [wrong])
    )
    assert _status(lambda: client.infer("tiny", [_input(_x(17, 0))])).startswith("400")
    assert _status(lambda: client.infer("nope", [_input(_x(1, 0))])).startswith("404")
    assert _status(lambda: client.infer("tiny", [_input(_x(1, 0))], model_version="9")).startswith("404")
    assert _status(lambda: client.get_model_metadata("nope")).startswith("404")
    assert not client.is_model_ready("nope")
    named = [httpclient.InferRequestedOutput("probs")]
    assert "no output 'probs'" in _status(lambda: client.infer("tiny", [_input(_x(1, 0))], outputs=named))
    assert _status(lambda: client.load_model("tiny")).startswith("403")
    unknown_route = httpx.get(open_server.url + "/v2/nothing/here")
    assert unknown_route.status_code == 404 and "error" in unknown_route.json()


def test_hostile_bodies_never_crash_hang_or_leak(open_server: Server) -> None:
    url = open_server.url + "/v2/models/tiny/infer"
    header = json.dumps(
        {
            "inputs": [
                {"name": "input", "datatype": "FP32", "shape": [1, 8], "parameters": {"binary_data_size": 32}}
            ]
        }
    ).encode()
    cases = [
        (b"{not json", {}, 400),
        (b'{"inputs": 5}', {}, 400),
        (header + b"\0" * 32, {"Inference-Header-Content-Length": str(len(header) + 100)}, 400),
        (header + b"\0" * 31, {"Inference-Header-Content-Length": str(len(header))}, 400),
        (header + b"\0" * 33, {"Inference-Header-Content-Length": str(len(header))}, 400),
        (
            header.replace(b"[1, 8]", b"[4294967296, 4294967296]") + b"\0" * 32,
            {"Inference-Header-Content-Length": str(len(header) + 16)},
            400,
        ),
        (b"x" * (2 * 1024 * 1024), {}, 413),
    ]
    rss_before = _rss(open_server)
    with httpx.Client(timeout=10) as client:
        for _ in range(15):
            for body, headers, status in cases:
                response = client.post(url, content=body, headers=headers)
                assert response.status_code == status, (body[:60], response.text)
                assert "error" in response.json()
    assert _rss(open_server) - rss_before < 64 * 1024 * 1024
    ok = httpclient.InferenceServerClient(open_server.address).infer("tiny", [_input(_x(1, 0))])
    assert ok.as_numpy("logits").shape == (1, 4)


def _rss(server: Server) -> int:
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_metrics_report_outcomes_latency_queue_compute_memory(open_server: Server) -> None:
    client = httpclient.InferenceServerClient(open_server.address)
    client.infer("tiny", [_input(_x(2, 0))], model_version="1")
    _status(lambda: client.infer("tiny", [_input(_x(1, 0)[:, :7])], model_version="1"))
    text = httpx.get(open_server.url + "/metrics").text
    for needle in (
        'inferforge_requests_total{model="tiny",outcome="success",version="1"}',
        'inferforge_requests_total{model="tiny",outcome="invalid",version="1"}',
        'inferforge_request_latency_seconds_count{model="tiny",version="1"}',
        'inferforge_queue_seconds_count{model="tiny",version="1"}',
        'inferforge_compute_seconds_count{model="tiny",version="1"}',
        'inferforge_batch_size_bucket{le="1.0",model="tiny",version="1"}',
        'inferforge_inflight_requests{model="tiny"} 0.0',
        'inferforge_model_ready{model="tiny",version="1"} 1.0',
        'inferforge_device_memory_bytes{device="cpu",kind="max_rss"}',
    ):
        assert needle in text, needle


def test_api_keys_guard_inference_and_management(secured_server: tuple[Server, Path]) -> None:
    server, repo = secured_server
    anonymous = httpclient.InferenceServerClient(server.address)
    assert anonymous.is_server_live()  # health stays open for probes
    assert _status(lambda: anonymous.infer("tiny", [_input(_x(1, 0))])).startswith("401")
    assert _status(
        lambda: anonymous.infer("tiny", [_input(_x(1, 0))], headers={"Authorization": "Bearer wrong"})
    ).startswith("401")
    assert _status(lambda: anonymous.unload_model("tiny")).startswith("401")
    auth = {"Authorization": f"Bearer {KEY}"}
    client = httpclient.InferenceServerClient(server.address)
    assert client.infer("tiny", [_input(_x(1, 0))], headers=auth).get_response()["model_version"] == "2"

    client.unload_model("tiny", headers=auth)
    assert not client.is_model_ready("tiny", headers=auth)
    assert _status(lambda: client.infer("tiny", [_input(_x(1, 0))], headers=auth)).startswith("503")
    states = {(r["name"], r["version"]): r["state"] for r in client.get_model_repository_index(headers=auth)}
    assert states[("tiny", "2")] == "UNAVAILABLE"
    assert client.is_server_ready()  # an unloaded model is not a failure

    from .tiny import write

    (write(repo / "tiny" / "3", seed=3) / "manifest.json").write_text("{}")
    client.load_model("tiny", headers=auth)
    x = _x(2, 5)
    result = client.infer("tiny", [_input(x)], headers=auth)
    assert result.get_response()["model_version"] == "3"
    np.testing.assert_allclose(
        result.as_numpy("logits"),
        TinyServable("t", "3", seed=3).predict({"input": x})["logits"],
        rtol=1e-5,
        atol=1e-6,
    )
    assert _status(lambda: client.load_model("absent", headers=auth)).startswith("404")
