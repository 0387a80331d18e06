"""Registry: artifact folders (manifest, safetensors weights, recipe), and loading them back as `Servable`s.

Names load on first use: the server's protocol layer imports the light `servable` contract without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "examples": "artifact",
    "find_artifact": "artifact",
    "load_variant": "artifact",
    "read_manifest": "artifact",
    "save_artifact": "artifact",
    "export_artifact": "export",
    "SCHEMA_VERSION": "manifest",
    "Manifest": "manifest",
    "VariantServable": "runtime",
    "load_servable": "runtime",
    "BatchingHints": "servable",
    "Servable": "servable",
    "TensorSpec": "servable",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(name)
    return getattr(importlib.import_module(f"inferforge.registry.{_WHERE[name]}"), name)
