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
from inferforge.serve.datatypes import ServeTensorSpec


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


class TypesServable:
    """BF16 and BYTES in and out: x + 1 computed in bfloat16 by torch, a float32 row sum, and each string
    upper-cased with its length, so every answer can be checked against an independent computation."""

    platform = "pytorch"

    def __init__(self, name: str, version: str, max_batch_size: int = 16) -> None:
        self.name, self.version, self.device = name, version, "cpu"
        self.inputs = (ServeTensorSpec("x", "BF16", (-1, 4)), ServeTensorSpec("text", "BYTES", (-1,)))
        self.outputs = (
            ServeTensorSpec("x_plus_one", "BF16", (-1, 4)),
            TensorSpec("x_sum", "FP32", (-1,)),
            ServeTensorSpec("upper", "BYTES", (-1,)),
            TensorSpec("length", "INT64", (-1,)),
        )
        self.batching = BatchingHints(max_batch_size=max_batch_size)

    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = torch.from_numpy(inputs["x"]).view(torch.bfloat16)  # uint16 bits -> bfloat16, no copy
        plus = (x + 1).view(torch.int16).numpy().view(np.uint16)
        text = inputs["text"]
        upper = np.empty(len(text), dtype=object)
        upper[:] = [t.upper() for t in text]
        return {
            "x_plus_one": plus,
            "x_sum": x.float().sum(dim=1).numpy(),
            "upper": upper,
            "length": np.array([len(t) for t in text], dtype=np.int64),
        }

    def close(self) -> None:
        pass


def write(folder: Path, **options: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tiny.json").write_text(json.dumps(options))
    return folder


def load(
    path: str | Path, *, device: str | None = None, name: str | None = None, version: str = "1"
) -> TinyServable:
    options = json.loads((Path(path) / "tiny.json").read_text())
    time.sleep(float(options.pop("load_delay_s", 0.0)))
    if options.pop("kind", None) == "types":
        return TypesServable(name or Path(path).name, version, **options)  # type: ignore[return-value]
    return TinyServable(name or Path(path).name, version, **options)
