"""Library versions recorded in results.json and in every artifact's manifest, so a figure can be traced.

Below every stage, because both `tune` (results) and `registry` (manifests) record them.
"""

from __future__ import annotations

import importlib.metadata
import platform

RECORDED = ("inferforge", "torch", "torchao", "transformers", "onnxruntime", "numpy", "safetensors")


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in RECORDED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
