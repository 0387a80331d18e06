"""Evaluation data: `.npz` tensors with optional labels, `.jsonl` text, built-in real data, or labelled
synthetic.

Every example set becomes named tensors with the batch on dim 0 (text is tokenized with the model's own
tokenizer), so later stages never care where the data came from. The fingerprint goes into the artifact's
manifest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inferforge.errors import DataError
from inferforge.models.loaded import LoadedModel
from inferforge.signature import TensorSpec

LABEL_KEYS = ("labels", "label", "y", "targets")


@dataclass(frozen=True)
class EvalData:
    """Named input tensors (batch on dim 0), optional labels, and a digest of both."""

    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None
    fingerprint: str
    source: str
    synthetic: bool = False  # random tensors: fine for speed and fidelity, never a claim about accuracy

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]

    def rows(self, index: torch.Tensor | slice) -> tuple[torch.Tensor, ...]:
        return tuple(t[index] for t in self.inputs.values())


def _fingerprint(inputs: dict[str, torch.Tensor], labels: torch.Tensor | None) -> str:
    digest = hashlib.sha256()
    for name, tensor in [*inputs.items(), ("__labels__", labels)]:
        if tensor is not None:
            array = tensor.contiguous().numpy()
            digest.update(f"{name}:{array.dtype}:{array.shape}".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def _make(
    inputs: dict[str, np.ndarray], labels: np.ndarray | None, source: str, synthetic: bool = False
) -> EvalData:
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in inputs.items()}
    label_tensor = None if labels is None else torch.from_numpy(np.ascontiguousarray(labels)).long()
    sizes = {k: t.shape[0] for k, t in tensors.items()}
    if not tensors or len(set(sizes.values())) != 1 or 0 in sizes.values():
        raise DataError(f"{source}: inputs must share a non-zero first (batch) dimension, got {sizes}")
    if label_tensor is not None and label_tensor.shape[0] != next(iter(sizes.values())):
        raise DataError(f"{source}: {label_tensor.shape[0]} labels for {next(iter(sizes.values()))} examples")
    return EvalData(tensors, label_tensor, _fingerprint(tensors, label_tensor), source, synthetic)


def _tokenize(texts: list[str], model: LoadedModel, source: str) -> dict[str, np.ndarray]:
    if model.tokenizer is None:
        raise DataError(f"{source}: text data needs a model with a tokenizer (a Hugging Face folder)")
    if not texts:
        raise DataError(f"{source}: no texts")
    encoded = model.tokenizer(
        texts, padding="longest", truncation=True, max_length=model.max_seq_len, return_tensors="np"
    )
    return {
        "input_ids": encoded["input_ids"].astype(np.int64),
        "attention_mask": encoded["attention_mask"].astype(np.int64),
    }


def _read_jsonl(path: Path, model: LoadedModel) -> EvalData:
    texts, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            texts.append(str(record["text"]))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise DataError(
                f"{path}:{number}: each line must be a JSON object with a 'text' field ({exc})"
            ) from exc
        if "label" in record:
            labels.append(int(record["label"]))
    if labels and len(labels) != len(texts):
        raise DataError(f"{path}: some lines have a 'label' and some do not")
    return _make(_tokenize(texts, model, str(path)), np.array(labels) if labels else None, str(path))


def _read_npz(path: Path, model: LoadedModel) -> EvalData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz (object arrays are refused): {exc}") from exc
    labels = next((arrays.pop(k) for k in LABEL_KEYS if k in arrays), None)
    if model.inputs:
        names = model.input_names
        if len(names) == 1 and len(arrays) == 1 and names[0] not in arrays:
            arrays = {names[0]: next(iter(arrays.values()))}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{path} lacks input(s) {missing}; it holds {sorted(arrays)}")
        arrays = {n: arrays[n] for n in names}
    return _make(arrays, labels, str(path))


def _synthetic(spec: str) -> EvalData:
    """`random:N:3x224x224`: N normal samples of that shape; only for speed and fidelity, flagged as such."""
    try:
        _, count, shape = spec.split(":")
        dims = tuple(int(d) for d in shape.split("x"))
        n = int(count)
    except ValueError:
        raise DataError(f"bad synthetic data spec {spec!r}: use random:N:DxDxD (flag --data)") from None
    rng = np.random.default_rng(0)
    return _make({"input": rng.standard_normal((n, *dims), dtype=np.float32)}, None, spec, synthetic=True)


def _builtin(name: str, model: LoadedModel) -> EvalData:
    if name == "digits":
        from inferforge.models.builtin.digits import digits_split

        _, _, x_test, y_test = digits_split()
        return _make({"input": x_test}, y_test, "builtin:digits")
    if name == "stdlib-text":
        from inferforge.models.builtin.stdlib_text import stdlib_sentences

        return _make(_tokenize(stdlib_sentences(), model, "builtin:stdlib-text"), None, "builtin:stdlib-text")
    raise DataError(
        f"unknown built-in data {name!r}; choose builtin:digits or builtin:stdlib-text (flag --data)"
    )


def check_fits(data: EvalData, model: LoadedModel) -> None:
    """Fill in a model's signature from the data, or check the data against the signature it declares."""
    if not model.inputs:
        model.inputs = tuple(TensorSpec.from_array(name, t.numpy()) for name, t in data.inputs.items())
        return
    for spec in model.inputs:
        tensor = data.inputs.get(spec.name)
        if tensor is None:
            raise DataError(f"data {data.source} has no input {spec.name!r} (it has {sorted(data.inputs)})")
        if not spec.fits(tuple(tensor.shape)):
            raise DataError(
                f"data {data.source}: input {spec.name!r} has shape {tuple(tensor.shape)}, "
                f"but the model expects {spec.shape} (-1 = any)"
            )


def load_data(spec: str | None, model: LoadedModel) -> EvalData:
    """Read `spec` for `model`; None means the model's own built-in data."""
    spec = spec or model.default_data
    if spec is None:
        raise DataError(f"model {model.source} has no built-in data: pass --data (an .npz or .jsonl file)")
    if spec.startswith("builtin:"):
        data = _builtin(spec.removeprefix("builtin:"), model)
    elif spec.startswith("random:"):
        data = _synthetic(spec)
    else:
        path = Path(spec)
        if not path.is_file():
            raise DataError(f"data file {path} does not exist (flag --data)")
        readers = {".npz": _read_npz, ".jsonl": _read_jsonl}
        if path.suffix not in readers:
            raise DataError(f"data file {path}: use .npz (tensors) or .jsonl (text), not {path.suffix!r}")
        data = readers[path.suffix](path, model)
    check_fits(data, model)
    return data
