from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from inferforge.errors import ArtifactError
from inferforge.registry import examples, export_artifact, load_servable, read_manifest


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    return {
        r: export_artifact(root / r, "builtin:digits", recipe=r)
        for r in ("fp32", "int8_dynamic", "onnxruntime")
    }


@pytest.mark.parametrize("recipe", ["fp32", "int8_dynamic", "onnxruntime"])
def test_loaded_artifact_reproduces_its_validated_outputs(artifacts: dict[str, Path], recipe: str) -> None:
    servable = load_servable(artifacts[recipe])
    stored = examples(artifacts[recipe])
    out = servable.predict({"input": stored["input.input"].numpy()})
    np.testing.assert_allclose(out["logits"], stored["output"].numpy(), rtol=0, atol=1e-5)
    assert servable.inputs[0].shape == (-1, 64) and servable.outputs[0].shape == (-1, 10)
    assert servable.platform == ("onnxruntime" if recipe == "onnxruntime" else "pytorch")


def test_manifest_is_self_describing(artifacts: dict[str, Path]) -> None:
    manifest = read_manifest(artifacts["int8_dynamic"])
    assert manifest.recipe == [{"name": "int8_dynamic", "version": 1}]
    assert manifest.model["source"] == "builtin:digits" and len(manifest.model["sha256"]) == 64
    assert manifest.data["source"] == "builtin:digits" and len(manifest.data["fingerprint"]) == 64
    assert {"torch", "torchao", "python"} <= set(manifest.versions)
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in artifacts["fp32"].iterdir())


def test_text_model_artifact_round_trips(tmp_path: Path, tiny_bert_dir: Path) -> None:
    path = export_artifact(tmp_path / "bert", str(tiny_bert_dir), recipe="bf16", data="builtin:stdlib-text")
    assert (path / "base" / "config.json").is_file() and (path / "base" / "tokenizer.json").is_file()
    shutil.rmtree(tiny_bert_dir.parent / "moved", ignore_errors=True)
    servable = load_servable(path)
    stored = examples(path)
    out = servable.predict(
        {
            "input_ids": stored["input.input_ids"].numpy(),
            "attention_mask": stored["input.attention_mask"].numpy(),
        }
    )
    np.testing.assert_allclose(out["embedding"], stored["output"].numpy(), atol=1e-6)


def test_altered_weights_are_detected(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "altered"
    shutil.copytree(artifacts["fp32"], copy)
    weights = load_file(str(copy / "weights.safetensors"))
    weights["head.3.bias"] = weights["head.3.bias"] + 1.0
    save_file(weights, str(copy / "weights.safetensors"))
    with pytest.raises(ArtifactError, match="do not match the manifest"):
        load_servable(copy)


def test_not_an_artifact_and_wrong_schema(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    with pytest.raises(ArtifactError, match="not an artifact"):
        load_servable(tmp_path)
    copy = tmp_path / "old"
    shutil.copytree(artifacts["fp32"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"schema_version": 99}))
    with pytest.raises(ArtifactError, match="schema 99"):
        load_servable(copy)


def test_cuda_artifact_on_a_cpu_machine_says_so(tmp_path: Path, artifacts: dict[str, Path]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    copy = tmp_path / "gpu"
    shutil.copytree(artifacts["fp32"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(manifest | {"device": "cuda"}))
    with pytest.raises(ArtifactError, match="no CUDA device"):
        load_servable(copy)
    assert load_servable(copy, device="cpu").device == "cpu"


def test_onnxruntime_text_model_artifact_round_trips(tmp_path: Path, tiny_bert_dir: Path) -> None:
    """An encoder whose output name could collide with a graph node's ('embedding') exports and serves."""
    path = export_artifact(
        tmp_path / "bert-ort", str(tiny_bert_dir), recipe="onnxruntime", data="builtin:stdlib-text"
    )
    servable = load_servable(path)
    stored = examples(path)
    feed = {n: stored[f"input.{n}"].numpy() for n in ("input_ids", "attention_mask")}
    np.testing.assert_allclose(servable.predict(feed)["embedding"], stored["output"].numpy(), atol=1e-5)
    assert servable.platform == "onnxruntime"
