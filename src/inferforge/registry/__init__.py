"""Registry: artifact folders (manifest, safetensors weights, recipe), and loading them back as `Servable`s."""

from inferforge.registry.artifact import examples, find_artifact, load_variant, read_manifest, save_artifact
from inferforge.registry.export import export_artifact
from inferforge.registry.manifest import SCHEMA_VERSION, Manifest
from inferforge.registry.runtime import VariantServable, load_servable
from inferforge.registry.servable import BatchingHints, Servable, TensorSpec

__all__ = [
    "SCHEMA_VERSION", "BatchingHints", "Manifest", "Servable", "TensorSpec", "VariantServable", "examples",
    "export_artifact", "find_artifact", "load_servable", "load_variant", "read_manifest", "save_artifact",
]
