"""Artifact folders: save the chosen variant as a self-describing folder, and load it back as a `Servable`.

The folder keeps the fp32 base weights (safetensors) and the recipe rather than the transformed module:
quantizing and compiling again on load is deterministic and works on any torch that can run the recipe, while
pickled modules and tensor subclasses are neither portable nor safe to load. Example inputs and the variant's
outputs on them are stored too, so a load can prove it reproduces what was validated.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from inferforge.errors import ArtifactError
from inferforge.models.data import EvalData
from inferforge.models.loaded import LoadedModel
from inferforge.models.sources import construct, state_dict_sha256
from inferforge.models.tasks import get_task
from inferforge.registry.manifest import MANIFEST, SCHEMA_VERSION, Manifest
from inferforge.registry.servable import BatchingHints, TensorSpec
from inferforge.signature import NUMPY_TO_V2
from inferforge.techniques import Recipe, Variant, apply_recipe

HF_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "merges.txt",
    "vocab.json",
    "sentencepiece.bpe.model",
    "spiece.model",
)
EXAMPLE_ROWS = 4


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def output_spec(model: LoadedModel, outputs: torch.Tensor) -> TensorSpec:
    shape = (-1, *outputs.shape[1:])
    return TensorSpec(model.output.name, NUMPY_TO_V2[np.dtype(np.float32)], tuple(int(d) for d in shape))


def batching_hints(recipe: Recipe, batch_sizes: tuple[int, ...]) -> BatchingHints:
    cudagraphs = any(s.name == "compile" and getattr(s, "mode", "") != "default" for s in recipe.steps)
    sizes = tuple(sorted(batch_sizes)) or (1,)
    return BatchingHints(
        max_batch_size=max(sizes),
        preferred_batch_sizes=sizes,
        pad_to_batch_sizes=cudagraphs,
        batch_sizes=sizes,
    )


def save_artifact(
    out_dir: Path,
    *,
    name: str,
    model: LoadedModel,
    data: EvalData,
    variant: Variant,
    batch_sizes: tuple[int, ...],
    quality: dict | None = None,
    bench: dict | None = None,
) -> Path:
    """Write the artifact folder atomically (a temporary folder renamed into place)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + f".tmp{int(time.time() * 1e6)}")
    tmp.mkdir(parents=True)
    save_model(model.module, str(tmp / "weights.safetensors"))
    examples = data.rows(slice(0, min(EXAMPLE_ROWS, len(data))))
    outputs = variant(*examples).cpu()
    tensors = {f"input.{n}": t.contiguous() for n, t in zip(model.input_names, examples, strict=True)}
    save_file({**tensors, "output": outputs.contiguous()}, str(tmp / "examples.safetensors"))
    if "model.onnx" in variant.context.artifacts:
        (tmp / "model.onnx").write_bytes(variant.context.artifacts["model.onnx"])
    if model.hf_dir is not None:
        (tmp / "base").mkdir()
        for file in HF_FILES:
            if (model.hf_dir / file).is_file():
                shutil.copy2(model.hf_dir / file, tmp / "base" / file)
    if model.rebuild.get("kind") == "pt2":
        shutil.copy2(model.rebuild["path"], tmp / "model.pt2")
    hints = batching_hints(variant.recipe, batch_sizes)
    manifest = Manifest(
        name=name,
        model={
            "source": model.source,
            "sha256": model.source_sha256,
            "task": model.task.name,
            "rebuild": {k: v for k, v in model.rebuild.items() if k != "path"},
            "weights_sha256": state_dict_sha256(model.module),
        },
        recipe=variant.recipe.to_json(),
        inputs=[s.to_json() for s in model.inputs],
        outputs=[output_spec(model, outputs).to_json()],
        device=variant.device.type,
        device_name=device_name(variant.device),
        data={
            "source": data.source,
            "fingerprint": data.fingerprint,
            "synthetic": data.synthetic,
            "rows": len(data),
        },
        quality=quality,
        bench=bench,
        notes=list(variant.context.notes),
        batching={
            "max_batch_size": hints.max_batch_size,
            "preferred_batch_sizes": list(hints.preferred_batch_sizes),
            "pad_to_batch_sizes": hints.pad_to_batch_sizes,
        },
    )
    (tmp / MANIFEST).write_text(json.dumps(manifest.to_json(), indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def find_artifact(path: Path) -> Path:
    """The artifact folder itself, or the `artifact/` inside a run folder."""
    path = Path(path)
    for candidate in (path, path / "artifact"):
        if (candidate / MANIFEST).is_file():
            return candidate
    raise ArtifactError(f"{path} is not an artifact: no {MANIFEST} in it or in {path / 'artifact'}")


def read_manifest(path: Path) -> Manifest:
    folder = find_artifact(path)
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{folder / MANIFEST} is not valid JSON: {exc}") from exc
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(f"{folder}: manifest schema {data.get('schema_version')} is not {SCHEMA_VERSION}")
    return Manifest.from_json(data)


def load_variant(path: Path, device: str | None = None) -> tuple[Manifest, LoadedModel, Variant]:
    """Rebuild the fp32 model from the artifact, check its weights' digest, and apply the recipe again."""
    folder = find_artifact(path)
    manifest = read_manifest(folder)
    module = construct(manifest.model["rebuild"], folder)
    for file in ("weights.safetensors", "examples.safetensors"):
        if not (folder / file).is_file():
            raise ArtifactError(f"{folder} lacks {file}")
    load_model(module, str(folder / "weights.safetensors"), strict=True)
    module.eval()
    expected = manifest.model.get("weights_sha256")
    if expected and state_dict_sha256(module) != expected:
        raise ArtifactError(f"{folder}: weights do not match the manifest's digest (the folder was altered)")
    inputs = tuple(TensorSpec.from_json(s) for s in manifest.inputs)
    outputs = tuple(TensorSpec.from_json(s) for s in manifest.outputs)
    model = LoadedModel(
        module=module,
        task=get_task(manifest.model["task"]),
        inputs=inputs,
        output=outputs[0],
        source=manifest.model["source"],
        source_sha256=manifest.model["sha256"],
        rebuild=manifest.model["rebuild"],
    )
    examples = load_file(str(folder / "examples.safetensors"))
    example_inputs = tuple(examples[f"input.{s.name}"] for s in inputs)
    target = device or manifest.device
    if target.startswith("cuda") and not torch.cuda.is_available():
        raise ArtifactError(
            f"{folder} was built for {target}, and this machine has no CUDA device; pass device='cpu'"
        )
    preloaded = (
        {"model.onnx": (folder / "model.onnx").read_bytes()} if (folder / "model.onnx").is_file() else {}
    )
    variant = apply_recipe(
        Recipe.from_json(manifest.recipe), model, example_inputs, target, preloaded=preloaded
    )
    return manifest, model, variant


def examples(path: Path) -> dict[str, torch.Tensor]:
    """The stored example inputs (`input.<name>`) and the variant's outputs on them (`output`)."""
    return load_file(str(find_artifact(path) / "examples.safetensors"))
