from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferforge.errors import DataError, ModelSourceError
from inferforge.models import load_data, load_model


def test_factory_model_takes_its_signature_from_the_data(tmp_path: Path) -> None:
    import numpy as np

    model = load_model("torch.nn:Identity", task="tensor")
    assert model.inputs == ()
    path = tmp_path / "x.npz"
    np.savez(path, x=np.arange(12, dtype=np.float32).reshape(3, 4))
    data = load_data(str(path), model)
    assert [s.name for s in model.inputs] == ["x"] and model.inputs[0].shape == (-1, 4)
    assert torch.equal(data.inputs["x"][1], torch.tensor([4.0, 5.0, 6.0, 7.0]))


def test_hf_folder_loads_offline_as_an_embedding_model(tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    assert model.task.name == "embedding" and model.input_names == ("input_ids", "attention_mask")
    ids = torch.tensor([[101, 2023, 102, 0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    vector = model.module(ids, mask)
    assert vector.shape == (1, 64)
    assert torch.allclose(vector.norm(dim=-1), torch.ones(1), atol=1e-5)


def test_hf_folder_with_pickled_weights_is_refused(tmp_path: Path, tiny_bert_dir: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_bert_dir / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ModelSourceError, match="pickled weights are refused"):
        load_model(str(folder))


def test_pt2_archive_loads(tmp_path: Path) -> None:
    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU())
    example = (torch.randn(2, 4),)
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(module, example), str(path))
    loaded = load_model(str(path), task="tensor")
    x = torch.randn(2, 4)
    assert torch.allclose(loaded.module(x), module(x))


@pytest.mark.parametrize("spec", ["/no/such/model.pt2", "no/such/folder", "builtin:nope"])
def test_missing_models_name_the_flag(spec: str) -> None:
    with pytest.raises(ModelSourceError, match=r"--model|does not exist"):
        load_model(spec)


def test_unimportable_factory_is_a_clear_error() -> None:
    with pytest.raises(ModelSourceError, match="cannot import model factory"):
        load_model("no_such_package.mod:build")


def test_unknown_task_names_the_flag() -> None:
    with pytest.raises(DataError, match="--task"):
        load_model("builtin:digits", task="segmentation")


def test_builtin_digits_classifier_is_accurate(digits) -> None:
    model, data = digits
    logits = model.module(*data.rows(slice(None)))
    accuracy = model.task.metric(logits, data.labels, logits)
    assert len(data) == 540 and accuracy > 95.0
