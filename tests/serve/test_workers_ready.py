"""Readiness with several HTTP processes counts only live workers that finished loading."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inferforge.serve.workers import PREFIX, mark_ready, ready_workers


def test_ready_workers_counts_live_marked_processes(tmp_path: Path) -> None:
    assert ready_workers(tmp_path) == 0
    mark_ready(tmp_path)  # this process
    assert ready_workers(tmp_path) == 1
    sibling = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / f"{PREFIX}{sibling.pid}").touch()
        assert ready_workers(tmp_path) == 2
    finally:
        sibling.kill()
        sibling.wait()
    assert ready_workers(tmp_path) == 1  # a dead worker's marker no longer counts
    (tmp_path / f"{PREFIX}not-a-pid").touch()
    assert ready_workers(tmp_path) == 1
