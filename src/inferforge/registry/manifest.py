"""The artifact's `manifest.json`: everything needed to rebuild, trust and serve the chosen variant."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from inferforge.versions import library_versions

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


@dataclass
class Manifest:
    name: str
    model: dict[str, Any]  # source, sha256 (of the fp32 weights), task, rebuild
    recipe: list[dict[str, Any]]
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    device: str  # where it was validated and timed, e.g. "cuda" or "cpu"
    device_name: str
    data: dict[str, Any]  # source, fingerprint, synthetic
    quality: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    batching: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=library_versions)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})
