"""Shared fixtures: the built-in digits classifier and a tiny Hugging Face encoder folder, built once per
session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="session")
def digits():
    from inferforge.models import load_data, load_model

    model = load_model("builtin:digits")
    return model, load_data(None, model)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer BERT with random weights (fixed seed) and the MiniLM tokenizer, saved as safetensors."""
    from transformers import BertConfig, BertModel

    from inferforge.models.sources import minilm_dir

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy2(minilm_dir() / name, folder / name)
    return folder
