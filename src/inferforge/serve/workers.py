"""Readiness across `--http-workers` processes: each says so in the shared folder once its models are loaded.

Each process answers the readiness probe it happens to receive; without this, the first worker to finish
loading made the whole server look ready while its siblings still answered 503.
"""

from __future__ import annotations

import os
from pathlib import Path

PREFIX = "ready-"


def mark_ready(shared_dir: str | Path) -> None:
    """Record that this process has loaded every model it serves."""
    (Path(shared_dir) / f"{PREFIX}{os.getpid()}").touch()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ready_workers(shared_dir: str | Path) -> int:
    """How many live processes have marked themselves ready (a dead worker's marker does not count)."""
    count = 0
    for marker in Path(shared_dir).glob(f"{PREFIX}*"):
        pid = marker.name.removeprefix(PREFIX)
        if pid.isdigit() and _alive(int(pid)):
            count += 1
    return count
