"""`/metrics` of an `--http-workers` server describes every process, whichever one answers the scrape."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import tritonclient.http as httpclient
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from tritonclient.utils import InferenceServerException

from .conftest import start_server
from .tiny import write

ROUND = 40
MAX_ROUNDS = 10
SCRAPES = 8


def _sample(text: str, name: str, labels: str) -> float:
    """The value of one sample line; fails the test when the series is missing."""
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    assert match, f"{name}{{{labels}}} missing from:\n{text}"
    return float(match.group(1))


def _per_process_requests(server_pid: int, tmp: Path) -> list[float]:
    """Each worker's own request count, read from its own multiprocess file through prometheus-client.

    The folder is found in the workers' environment (the parent made it); a process that answered no
    inference has no counter file, so the positive entries say how many processes took part.
    """
    children = Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split()
    folders = set()
    for pid in children:
        for entry in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
            if entry.startswith(b"PROMETHEUS_MULTIPROC_DIR="):
                folders.add(entry.split(b"=", 1)[1].decode())
    assert len(folders) == 1, folders
    counts = []
    for db in sorted(Path(folders.pop()).glob("counter_*.db")):
        alone = Path(tempfile.mkdtemp(dir=tmp))
        shutil.copy(db, alone / db.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(alone))
        text = generate_latest(registry).decode()
        name, labels = "inferforge_requests_total", 'model="tiny",outcome="success",version="1"'
        # A process that only answered 503 while starting has a file but no successes yet.
        counts.append(_sample(text, name, labels) if f"{name}{{{labels}}}" in text else 0.0)
    return counts


def test_metrics_sum_requests_over_all_http_worker_processes(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (write(repo / "tiny" / "1", seed=5) / "manifest.json").write_text("{}")
    server = start_server(repo, tmp_path, "--http-workers", "2")
    try:
        x = np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)

        def one(_: int) -> None:
            tensor = httpclient.InferInput("input", [1, 8], "FP32")
            tensor.set_data_from_numpy(x)
            for _ in range(200):  # the ready probe answered from one process; the other may still load
                fresh = httpclient.InferenceServerClient(server.address)  # a new connection per request
                try:
                    fresh.infer("tiny", [tensor])
                    return  # only successes are counted: the assertions read the "success" series
                except InferenceServerException as exc:
                    if not str(exc).startswith("[503]"):  # unloaded or loading, nothing else
                        raise
                finally:
                    fresh.close()
                time.sleep(0.05)
            raise AssertionError("a worker never finished loading")

        # Which process accepts a connection is the kernel's choice, and one idle process can win every
        # race; concurrent senders and further rounds (until both have answered) make the split certain.
        sent = 0
        with ThreadPoolExecutor(4) as pool:
            for _ in range(MAX_ROUNDS):
                list(pool.map(one, range(ROUND)))
                sent += ROUND
                per_process = _per_process_requests(server.process.pid, tmp_path)
                if sum(1 for n in per_process if n > 0) == 2:
                    break
        assert sum(1 for n in per_process if n > 0) == 2, per_process  # both workers answered
        assert sum(per_process) == sent, per_process
        scrapes = []
        for _ in range(SCRAPES):
            with httpx.Client() as client:
                text = client.get(server.url + "/metrics").text
            scrapes.append(text)
        labels = 'model="tiny",outcome="success",version="1"'
        totals = [_sample(t, "inferforge_requests_total", labels) for t in scrapes]
        assert totals == [float(sent)] * SCRAPES, totals
        latency = [
            _sample(t, "inferforge_request_latency_seconds_count", 'model="tiny",version="1"')
            for t in scrapes
        ]
        assert latency == [float(sent)] * SCRAPES, latency
        batches = [_sample(t, "inferforge_batch_size_sum", 'model="tiny",version="1"') for t in scrapes]
        assert batches == [float(sent)] * SCRAPES, batches  # one row per request, whichever process ran it
        for t in scrapes:
            assert _sample(t, "inferforge_inflight_requests", 'model="tiny"') == 0.0
            assert _sample(t, "inferforge_model_ready", 'model="tiny",version="1"') == 1.0
            assert t.count("# TYPE inferforge_requests_total counter") == 1  # one family, not one per process
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    assert "Traceback" not in server.log.read_text()
