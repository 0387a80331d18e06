"""`VariantServable`: a loaded artifact behind the `Servable` contract that the server batches for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from inferforge.errors import ArtifactError
from inferforge.registry.artifact import load_variant
from inferforge.registry.servable import BatchingHints, TensorSpec
from inferforge.techniques import Variant


class VariantServable:
    """Named numpy tensors in, named numpy tensors out, through the variant's recipe on its device."""

    def __init__(
        self,
        name: str,
        version: str,
        variant: Variant,
        inputs: tuple[TensorSpec, ...],
        outputs: tuple[TensorSpec, ...],
        batching: BatchingHints,
    ) -> None:
        self.name = name
        self.version = version
        self.variant = variant
        self.inputs = inputs
        self.outputs = outputs
        self.batching = batching
        self.device = str(variant.device)
        self.platform = "onnxruntime" if variant.recipe.label.endswith("onnxruntime") else "pytorch"

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [s.name for s in self.inputs if s.name not in inputs]
        if missing:
            raise ValueError(f"model {self.name!r} needs input(s) {missing}")
        tensors = tuple(torch.from_numpy(np.ascontiguousarray(inputs[s.name])) for s in self.inputs)
        output = self.variant(*tensors).cpu().numpy()
        return {self.outputs[0].name: output}

    def close(self) -> None:
        self.variant = None  # type: ignore[assignment]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_servable(
    path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"
) -> VariantServable:
    """Load an artifact folder (or a run folder holding `artifact/`) ready to serve."""
    manifest, model, variant = load_variant(Path(path), device)
    batching = manifest.batching or {}
    hints = BatchingHints(
        max_batch_size=int(batching.get("max_batch_size", 64)),
        preferred_batch_sizes=tuple(batching.get("preferred_batch_sizes", ())),
        pad_to_batch_sizes=bool(batching.get("pad_to_batch_sizes", False)),
        batch_sizes=tuple(batching.get("preferred_batch_sizes", ())),
    )
    outputs = tuple(TensorSpec.from_json(s) for s in manifest.outputs)
    if not outputs:
        raise ArtifactError(f"{path}: the manifest declares no outputs")
    return VariantServable(name or manifest.name, version, variant, model.inputs, outputs, hints)
