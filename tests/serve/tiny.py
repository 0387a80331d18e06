"""A real tiny model for serving tests: a torch MLP behind the `Servable` contract.

A folder holding `tiny.json` describes it; `load` has the signature of `inferforge.registry.load_servable`, so
the server takes it through `--loader tests.serve.tiny:load` and runs the real engine and HTTP stack on it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from inferforge.registry.servable import BatchingHints, TensorSpec


class TinyServable:
    platform = "pytorch"

    def __init__(
        self,
        name: str,
        version: str,
        *,
        features: int = 8,
        classes: int = 4,
        seed: int = 0,
        delay_s: float = 0.0,
        max_batch_size: int = 16,
        fail_load: bool = False,
    ) -> None:
        if fail_load:
            raise RuntimeError(f"tiny model {name!r} is configured to fail loading")
        self.name, self.version, self.device = name, version, "cpu"
        torch.manual_seed(seed)
        self.module = torch.nn.Sequential(
            torch.nn.Linear(features, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
        )
        self.module.eval()
        self.delay_s = delay_s
        self.inputs = (TensorSpec("input", "FP32", (-1, features)),)
        self.outputs = (TensorSpec("logits", "FP32", (-1, classes)), TensorSpec("label", "INT64", (-1,)))
        self.batching = BatchingHints(max_batch_size=max_batch_size)
        self.batch_sizes_seen: list[int] = []
        self.closed = False

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.batch_sizes_seen.append(int(inputs["input"].shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        with torch.inference_mode():
            logits = self.module(torch.from_numpy(inputs["input"]))
        return {"logits": logits.numpy(), "label": logits.argmax(dim=1).numpy().astype(np.int64)}

    def close(self) -> None:
        self.closed = True


def write(folder: Path, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(options))
    return folder


def load(
    path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"
) -> TinyServable:
    options = json.loads((Path(path) / "tiny.json").read_text())
    time.sleep(float(options.pop("load_delay_s", 0.0)))
    return TinyServable(name or Path(path).name, version, **options)
