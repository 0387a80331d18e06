"""The model repository: which models and versions exist on disk, which are served, and their state.

Layout: `repo/<model>/<version>/` (or one model's `<model>/<version>/`), where each version folder is an
artifact (it holds `manifest.json`) or a run folder (it holds `artifact/manifest.json`). A single artifact or
run folder is a repository of one model, version 1, named after the manifest's `name` or the folder. Versions
are immutable: a new version is a new folder; `load` rescans, so it picks up new versions and drops those the
version policy no longer selects."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from inferforge.errors import ArtifactError, InferforgeError
from inferforge.registry.servable import Servable
from inferforge.serve.engine import BatcherConfig, Engine, ModelNotFound, version_order

log = logging.getLogger(__name__)

Loader = Callable[..., Servable]  # (path, *, device, name, version) -> Servable, like registry.load_servable
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelState(StrEnum):
    READY = "READY"
    LOADING = "LOADING"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(frozen=True)
class VersionPolicy:
    """Which versions of each model are served: the newest N, specific ones, or all."""

    kind: str = "latest"
    latest_n: int = 1
    versions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("latest", "specific", "all"):
            raise InferforgeError(f"version policy {self.kind!r}: use latest:N, specific:V1,V2 or all")
        if self.kind == "latest" and self.latest_n < 1:
            raise InferforgeError(f"version policy latest:{self.latest_n}: N must be >= 1")
        if self.kind == "specific" and not self.versions:
            raise InferforgeError("version policy specific: name at least one version, e.g. specific:1,3")

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        kind, _, arg = text.partition(":")
        if kind == "latest":
            if arg and not arg.isdigit():
                raise InferforgeError(f"version policy {text!r}: N in latest:N must be a positive integer")
            return cls("latest", latest_n=int(arg or 1))
        if kind == "specific":
            return cls("specific", versions=tuple(v for v in arg.split(",") if v))
        return cls(kind)

    def select(self, versions: list[str]) -> list[str]:
        ordered = sorted(versions, key=version_order)
        if self.kind == "all":
            return ordered
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered[-self.latest_n :]


@dataclass(frozen=True)
class VersionStatus:
    name: str
    version: str
    state: ModelState
    reason: str = ""

    def to_json(self) -> dict:
        return {"name": self.name, "version": self.version, "state": self.state.value, "reason": self.reason}


def is_artifact(folder: Path) -> bool:
    return (folder / "manifest.json").is_file() or (folder / "artifact" / "manifest.json").is_file()


def _versions(model_dir: Path) -> dict[str, Path]:
    return {v.name: v for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit() and is_artifact(v)}


def _single_name(folder: Path) -> str:
    for manifest in (folder / "manifest.json", folder / "artifact" / "manifest.json"):
        if manifest.is_file():
            try:
                name = json.loads(manifest.read_text()).get("name")
            except (OSError, ValueError, AttributeError):
                name = None
            if isinstance(name, str) and _NAME.match(name):
                return name
    named = folder.parent if folder.name == "artifact" else folder
    return named.resolve().name


class ModelRepository:
    """Loads and unloads model versions into the engine and tells the truth about each one's state."""

    def __init__(
        self,
        root: str | Path,
        engine: Engine,
        loader: Loader,
        *,
        policy: VersionPolicy | None = None,
        device: str | None = None,
        batching: dict[str, object] | None = None,
        name: str | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise ArtifactError(
                f"model repository {str(root)!r} is not a folder; pass an artifact, run or repo folder"
            )
        self.engine = engine
        self.policy = policy or VersionPolicy()
        self._loader = loader
        self._device = device
        self._batching = batching or {}
        self._single = name or _single_name(self.root) if is_artifact(self.root) else None
        self._states: dict[tuple[str, str], VersionStatus] = {}
        self._lock = threading.RLock()
        self._model_locks: dict[str, threading.Lock] = {}
        self.startup_done = False
        self._last_scan: dict[str, dict[str, Path]] | None = None

    def known(self) -> dict[str, dict[str, Path]]:
        """The models and versions as of the last scan (startup, index, load): a request naming an unknown
        model must not make the server walk the repository folder, or a client could keep it on the disk."""
        return self._last_scan if self._last_scan is not None else self.scan()

    def scan(self) -> dict[str, dict[str, Path]]:
        """Every model and version on disk now (not only those served)."""
        self._last_scan = found = self._scan()
        return found

    def _scan(self) -> dict[str, dict[str, Path]]:
        if self._single is not None:
            return {self._single: {"1": self.root}}
        own = _versions(self.root)
        if own:  # one model's folder, <model>/<version>/
            return {self.root.resolve().name: own}
        found: dict[str, dict[str, Path]] = {}
        for model_dir in sorted(p for p in self.root.iterdir() if p.is_dir() and _NAME.match(p.name)):
            versions = _versions(model_dir)
            if versions:
                found[model_dir.name] = versions
        return found

    def load_all(self) -> None:
        try:
            for name in self.scan():
                self.load(name, missing_ok=True)
        finally:
            self.startup_done = True

    def load(self, name: str, missing_ok: bool = False) -> None:
        """(Re)load the versions the policy selects; versions it no longer selects are unloaded."""
        versions = self.scan().get(name)
        if versions is None:
            raise ModelNotFound(f"model {name!r} is not in the repository {str(self.root)!r}")
        with self._model_lock(name):
            wanted = self.policy.select(list(versions))
            if not wanted and not missing_ok:
                raise ModelNotFound(
                    f"model {name!r}: the version policy {self.policy} selects none of "
                    f"{sorted(versions, key=version_order)}"
                )
            for version in self._versions_of(name):
                if version not in wanted:
                    self._unload_version(name, version)
            for version in wanted:
                self._load_version(name, version, versions[version])

    def unload(self, name: str) -> None:
        known = self._versions_of(name)
        if not known and name not in self.scan():
            raise ModelNotFound(f"model {name!r} is not in the repository {str(self.root)!r}")
        with self._model_lock(name):
            for version in known:
                self._unload_version(name, version)

    def index(self) -> list[VersionStatus]:
        with self._lock:
            states = dict(self._states)
        for name, versions in self.scan().items():
            for version in versions:
                states.setdefault(
                    (name, version), VersionStatus(name, version, ModelState.UNAVAILABLE, "unloaded")
                )
        return [states[k] for k in sorted(states, key=lambda k: (k[0], version_order(k[1])))]

    def status(self, name: str, version: str | None = None) -> VersionStatus:
        """The named version's state, or the served one's (the highest ready) when none is named."""
        with self._lock:
            mine = {v: s for (n, v), s in self._states.items() if n == name}
        if version:
            if version in mine:
                return mine[version]
            if version in self.known().get(name, {}):
                return VersionStatus(name, version, ModelState.UNAVAILABLE, "unloaded")
            raise ModelNotFound(f"model {name!r} has no version {version!r} in the repository")
        if not mine:
            if name in self.known():
                return VersionStatus(name, "", ModelState.UNAVAILABLE, "unloaded")
            raise ModelNotFound(f"model {name!r} is not in the repository {str(self.root)!r}")
        ready = [v for v, s in mine.items() if s.state is ModelState.READY]
        pick = max(ready or list(mine), key=version_order)
        return mine[pick]

    def ready(self) -> bool:
        """Server readiness: startup loading finished and every version meant to be served is ready."""
        with self._lock:
            return self.startup_done and all(s.state is ModelState.READY for s in self._states.values())

    def _load_version(self, name: str, version: str, path: Path) -> None:
        self._set(name, version, ModelState.LOADING, "")
        instances: list[Servable] = []
        try:
            overrides = dict(self._batching)
            count = int(overrides.pop("instances", None) or 1)  # type: ignore[call-overload]
            for _ in range(count):
                instances.append(self._loader(path, device=self._device, name=name, version=version))
            config = BatcherConfig.from_hints(instances[0].batching, instances=count, **overrides)
            self.engine.add(instances, config)
        except Exception as exc:
            for inst in instances:
                inst.close()
            log.exception("loading model %s version %s from %s failed", name, version, path)
            self._set(name, version, ModelState.UNAVAILABLE, f"failed to load: {exc}")
            return
        self._set(name, version, ModelState.READY, "")

    def _unload_version(self, name: str, version: str) -> None:
        self._set(name, version, ModelState.UNLOADING, "")
        self.engine.remove(name, version)
        with self._lock:
            self._states.pop((name, version), None)

    def _versions_of(self, name: str) -> list[str]:
        with self._lock:
            return [v for (n, v) in self._states if n == name]

    def _set(self, name: str, version: str, state: ModelState, reason: str) -> None:
        with self._lock:
            self._states[(name, version)] = VersionStatus(name, version, state, reason)

    def _model_lock(self, name: str) -> threading.Lock:
        with self._lock:
            return self._model_locks.setdefault(name, threading.Lock())
