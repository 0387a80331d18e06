from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from inferforge.llm.tiny import make_tiny_llama


def test_tiny_folder_loads_like_a_hub_model(tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    names = {p.name for p in tiny_llama.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pth")) for n in names)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    assert model.config.vocab_size == len(tok)
    text = "Return a new list of the lines."
    assert tok.decode(tok.encode(text)) == text
    messages = [{"role": "user", "content": "hi"}]
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|user|>hi<|end|><|assistant|>"


def test_same_seed_same_weights(tmp_path: Path, tiny_dirs: dict[str, Path]) -> None:
    again = make_tiny_llama(tmp_path / "again", family="qwen2", seed=0)
    other = make_tiny_llama(tmp_path / "other", family="qwen2", seed=1)

    def digest(p: Path) -> str:
        return hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()

    assert digest(again) == digest(tiny_dirs["qwen2"])
    assert digest(other) != digest(again)
    assert json.loads((again / "config.json").read_text())["model_type"] == "qwen2"


def test_unknown_family_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="family"):
        make_tiny_llama(tmp_path, family="bert")  # type: ignore[arg-type]
