from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from inferforge.errors import DataError
from inferforge.models import load_data, load_model


def test_npz_with_labels_and_a_renamed_single_input(tmp_path: Path, digits) -> None:
    model, _ = digits
    x = np.random.default_rng(1).random((10, 64), dtype=np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, pixels=x, labels=np.arange(10) % 10)
    data = load_data(str(path), model)
    assert torch.equal(data.inputs["input"], torch.from_numpy(x)) and data.labels.tolist() == list(range(10))


def test_npz_whose_shape_does_not_fit_is_refused(tmp_path: Path, digits) -> None:
    model, _ = digits
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((4, 32), dtype=np.float32))
    with pytest.raises(DataError, match=r"shape \(4, 32\).*expects \(-1, 64\)"):
        load_data(str(path), model)


def test_npz_with_object_arrays_is_refused(tmp_path: Path, digits) -> None:
    model, _ = digits
    path = tmp_path / "obj.npz"
    np.savez(path, input=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match="object arrays are refused"):
        load_data(str(path), model)


def test_jsonl_text_is_tokenized_with_the_model_tokenizer(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    path = tmp_path / "t.jsonl"
    path.write_text(
        "\n".join(json.dumps({"text": t}) for t in ["hello world", "a longer sentence here"]) + "\n"
    )
    data = load_data(str(path), model)
    ids, mask = data.inputs["input_ids"], data.inputs["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[0].sum() < mask[1].sum()
    assert ids[0, 0].item() == model.tokenizer.cls_token_id


def test_bad_jsonl_line_names_the_line(tmp_path: Path, tiny_bert_dir: Path) -> None:
    model = load_model(str(tiny_bert_dir))
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(DataError, match=r"t.jsonl:2"):
        load_data(str(path), model)


def test_missing_data_file_names_the_flag(digits) -> None:
    model, _ = digits
    with pytest.raises(DataError, match=r"does not exist.*--data"):
        load_data("/no/such.npz", model)


def test_fingerprint_changes_with_the_data(tmp_path: Path, digits) -> None:
    model, _ = digits
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    x = np.ones((3, 64), dtype=np.float32)
    np.savez(a, input=x)
    np.savez(b, input=x * 2)
    assert load_data(str(a), model).fingerprint != load_data(str(b), model).fingerprint
    assert load_data(str(a), model).fingerprint == load_data(str(a), model).fingerprint


def test_builtin_stdlib_text_is_real_english(tiny_bert_dir: Path) -> None:
    from inferforge.models.builtin.stdlib_text import stdlib_sentences

    texts = stdlib_sentences(64)
    assert len(texts) == 64 and len(set(texts)) == 64
    assert sum(" the " in t for t in texts) > 20


def test_synthetic_data_is_flagged() -> None:
    model = load_model("torch.nn:Identity", task="tensor")
    data = load_data("random:8:3x4x4", model)
    assert data.synthetic and data.inputs["input"].shape == (8, 3, 4, 4) and data.inputs["input"].std() > 0.5
