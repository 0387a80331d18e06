"""Backpressure, deadlines, truthful readiness, graceful shutdown, a real artifact, and the load generator."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from .conftest import REPO_ROOT, Server, start_server
from .tiny import write


def _request(rows: int = 1) -> dict:
    return {"inputs": [{"name": "input", "datatype": "FP32", "shape": [rows, 8], "data": [0.5] * (8 * rows)}]}


def _slow_repo(root: Path, delay_s: float = 0.25) -> Path:
    (write(root / "slow" / "1", delay_s=delay_s, max_batch_size=1) / "manifest.json").write_text("{}")
    return root


def _post_all(url: str, n: int, body: dict | None = None) -> list[httpx.Response | Exception]:
    results: list[httpx.Response | Exception] = [None] * n  # type: ignore[list-item]

    def one(i: int) -> None:
        try:
            results[i] = httpx.post(url, json=body or _request(), timeout=30)
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_a_full_queue_answers_503_with_retry_after(tmp_path: Path) -> None:
    server = start_server(_slow_repo(tmp_path / "repo"), tmp_path, "--max-queue-size", "2")
    try:
        results = _post_all(server.url + "/v2/models/slow/infer", 10)
        codes = sorted(r.status_code for r in results)  # type: ignore[union-attr]
        refused = [r for r in results if r.status_code == 503]  # type: ignore[union-attr]
        assert codes.count(200) >= 2 and refused, codes
        assert all(r.headers["Retry-After"] == "1" and "queue full" in r.json()["error"] for r in refused)
        metrics = httpx.get(server.url + "/metrics").text
        assert (
            f'inferforge_requests_total{{model="slow",outcome="rejected",version="1"}} {len(refused)}.0'
            in metrics
        )
    finally:
        server.stop()


def test_deadlines_are_answered_with_504_and_graceful_shutdown_loses_nothing(tmp_path: Path) -> None:
    server = start_server(_slow_repo(tmp_path / "repo", delay_s=0.5), tmp_path, "--graceful-timeout-s", "20")
    client = httpclient.InferenceServerClient(server.address)
    x = httpclient.InferInput("input", [1, 8], "FP32")
    x.set_data_from_numpy(np.ones((1, 8), np.float32))
    with pytest.raises(InferenceServerException) as info:
        client.infer("slow", [x], timeout=50_000)  # the V2 timeout parameter, in microseconds
    assert info.value.status() == "504" and "deadline" in info.value.message()

    results: list = []
    sender = threading.Thread(
        target=lambda: results.extend(_post_all(server.url + "/v2/models/slow/infer", 6))
    )
    sender.start()
    deadline = time.monotonic() + 20
    while _inflight(server, "slow") < 6:  # one computing (0.5 s each), the rest queued behind it
        assert time.monotonic() < deadline, "the requests never arrived"
        time.sleep(0.02)
    server.process.send_signal(signal.SIGTERM)
    sender.join(30)
    assert [r.status_code for r in results] == [200] * 6, [getattr(r, "text", r) for r in results]
    assert server.process.wait(30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean drain
    assert "Traceback" not in server.log.read_text()
    with pytest.raises(httpx.TransportError):
        httpx.get(server.url + "/v2/health/live", timeout=2)


def _inflight(server: Server, model: str) -> float:
    for line in httpx.get(server.url + "/metrics").text.splitlines():
        if line.startswith(f'inferforge_inflight_requests{{model="{model}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_readiness_tells_the_truth_while_loading_and_after_a_failure(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (write(repo / "late" / "1", load_delay_s=3.0) / "manifest.json").write_text("{}")
    (write(repo / "broken" / "1", fail_load=True) / "manifest.json").write_text("{}")
    server = start_server(repo, tmp_path, wait_ready=False)
    try:
        assert httpx.get(server.url + "/v2/health/live").status_code == 200
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503
        states = {r["name"]: r["state"] for r in httpx.post(server.url + "/v2/repository/index").json()}
        assert states["late"] in ("LOADING", "UNAVAILABLE")
        deadline = time.monotonic() + 30
        while httpx.get(server.url + "/v2/models/late/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        rows = {r["name"]: r for r in httpx.post(server.url + "/v2/repository/index").json()}
        assert rows["broken"]["state"] == "UNAVAILABLE" and "failed to load" in rows["broken"]["reason"]
        assert httpx.get(server.url + "/v2/health/ready").status_code == 503  # a model failed: not ready
        assert httpx.get(server.url + "/v2/models/broken/ready").status_code == 503
    finally:
        server.stop()


@pytest.fixture(scope="module")
def digits_server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A real artifact from `export_artifact`, served by the real CLI with the default loader."""
    from inferforge.registry import export_artifact

    tmp = tmp_path_factory.mktemp("digits")
    artifact = export_artifact(tmp / "runs" / "digits" / "artifact", "builtin:digits")
    port_server = _start_cli_server(tmp / "runs" / "digits", tmp)
    yield port_server, artifact
    port_server.stop()


def _start_cli_server(path: Path, log_dir: Path) -> Server:
    from .conftest import free_port

    port = free_port()
    log = log_dir / "digits.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with log.open("wb") as fh:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inferforge.cli",
                "serve",
                str(path),
                "--port",
                str(port),
                "--max-batch-size",
                "32",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    server = Server(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if httpx.get(server.url + "/v2/health/ready", timeout=1).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise AssertionError(log.read_text())


def test_a_real_artifact_answers_like_the_registry_loads_it(digits_server) -> None:  # type: ignore[no-untyped-def]
    from inferforge.registry import load_servable

    server, artifact = digits_server
    client = httpclient.InferenceServerClient(server.address)
    meta = client.get_model_metadata("digits")
    assert meta["inputs"][0]["shape"] == [-1, 64] and meta["outputs"][0]["name"] == "logits"
    assert client.get_model_config("digits")["max_batch_size"] == 32
    x = np.random.default_rng(3).random((5, 64)).astype(np.float32) * 16
    tensor = httpclient.InferInput("input", [5, 64], "FP32")
    tensor.set_data_from_numpy(x)
    got = client.infer("digits", [tensor]).as_numpy("logits")
    expected = load_servable(artifact).predict({"input": x})["logits"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scenario", ["closed", "server"])
def test_loadtest_reports_throughput_goodput_and_percentiles(
    digits_server, tmp_path: Path, scenario: str
) -> None:  # type: ignore[no-untyped-def]
    server, _ = digits_server
    out = tmp_path / "report.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "inferforge.cli",
        "loadtest",
        server.url,
        "--model",
        "digits",
        "--scenario",
        scenario,
        "--concurrency",
        "4",
        "--qps",
        "100",
        "--duration",
        "1.5",
        "--requests",
        "300",
        "--batch-size",
        "2",
        "--slo-ms",
        "1000",
        "--json-out",
        str(out),
    ]
    if scenario == "closed":
        cmd += ["--processes", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "latency p50 / p90 / p99" in done.stdout
    report = json.loads(out.read_text())
    assert report["ok"] == report["sent"] > 10 and report["statuses"] == {"200": report["sent"]}
    assert report["sent"] <= 300
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    assert report["throughput_rows_per_s"] == pytest.approx(2 * report["throughput_rps"])
    assert report["goodput_rps"] <= report["throughput_rps"]
    if scenario == "server":  # open loop at 100/s for 1.5 s: about 150 arrivals (Poisson)
        assert 90 < report["sent"] < 220


def test_loadtest_refuses_a_bad_url_with_one_line() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "inferforge.cli", "loadtest", "localhost:1", "--model", "m"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "give the server's base URL" in done.stderr


def test_serve_refuses_model_control_without_keys_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "inferforge.cli", "serve", str(tmp_path), "--enable-model-control"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert done.returncode == 2 and "--enable-model-control needs --api-key-file" in done.stderr
    assert "Traceback" not in done.stderr


def test_several_http_worker_processes_serve_the_same_port(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (write(repo / "tiny" / "1", seed=4) / "manifest.json").write_text("{}")
    server = start_server(repo, tmp_path, "--http-workers", "2")
    try:
        from .tiny import TinyServable

        client = httpclient.InferenceServerClient(server.address, concurrency=1)
        reference = TinyServable("tiny", "1", seed=4)
        for i in range(12):
            x = np.random.default_rng(i).standard_normal((2, 8)).astype(np.float32)
            tensor = httpclient.InferInput("input", [2, 8], "FP32")
            tensor.set_data_from_numpy(x)
            fresh = httpclient.InferenceServerClient(server.address)  # new connections spread over processes
            got = fresh.infer("tiny", [tensor]).as_numpy("logits")
            np.testing.assert_allclose(got, reference.predict({"input": x})["logits"], rtol=1e-5, atol=1e-6)
        assert client.is_server_ready()
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log.read_text()
