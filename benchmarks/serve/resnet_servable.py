"""Fallback for the benchmark when `export_artifact` cannot build the variant: torchvision ResNet-50 (random
weights) in bf16 channels-last behind the `Servable` contract, loadable with `--loader`.

The folder passed as the path holds `resnet.json` ({"arch": "resnet50"}); nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from inferforge.registry.servable import BatchingHints, TensorSpec


class ResNetServable:
    platform = "pytorch"

    def __init__(
        self, name: str, version: str, device: str, arch: str = "resnet50", max_batch_size: int = 128
    ):
        import torchvision

        torch.manual_seed(0)
        self.name, self.version, self.device = name, version, device
        module = getattr(torchvision.models, arch)(weights=None).eval()
        self.module = module.to(device=device, dtype=torch.bfloat16, memory_format=torch.channels_last)
        self.inputs = (TensorSpec("input", "FP32", (-1, 3, 224, 224)),)
        self.outputs = (TensorSpec("logits", "FP32", (-1, 1000)),)
        self.batching = BatchingHints(max_batch_size=max_batch_size)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            x = torch.from_numpy(inputs["input"]).to(self.device)
            x = x.to(dtype=torch.bfloat16, memory_format=torch.channels_last)
            return {"logits": self.module(x).float().cpu().numpy()}

    def close(self) -> None:
        self.module = None  # type: ignore[assignment]
        torch.cuda.empty_cache()


class NullServable:
    """Same signature as ResNet-50 but no model: what the HTTP layer and batcher alone can carry."""

    platform = "numpy"

    def __init__(self, name: str, version: str, max_batch_size: int = 128) -> None:
        self.name, self.version, self.device = name, version, "cpu"
        self.inputs = (TensorSpec("input", "FP32", (-1, 3, 224, 224)),)
        self.outputs = (TensorSpec("logits", "FP32", (-1, 1000)),)
        self.batching = BatchingHints(max_batch_size=max_batch_size)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["input"]
        return {"logits": np.repeat(x[:, 0, 0, :1], 1000, axis=1)}  # touches every request's rows

    def close(self) -> None:
        pass


def write(folder: Path, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "resnet.json").write_text(json.dumps(options))
    (folder / "manifest.json").write_text(json.dumps({"name": "resnet50"}))
    return folder


def load(path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"):  # type: ignore[no-untyped-def]
    options = json.loads((Path(path) / "resnet.json").read_text())
    return ResNetServable(name or "resnet50", version, device or "cuda", **options)


def load_null(path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"):  # type: ignore[no-untyped-def]
    options = json.loads((Path(path) / "resnet.json").read_text())
    return NullServable(name or "resnet50", version, max_batch_size=int(options.get("max_batch_size", 128)))
