"""Hugging Face model folders, loaded offline from safetensors, wrapped so they take tensors and return one.

No repository code runs (`trust_remote_code=False`) and pickled weights (`pytorch_model.bin`) are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import ModelSourceError


class MeanPooledEncoder(nn.Module):
    """Sentence embeddings the way sentence-transformers makes them: mean over real tokens, then
    L2-normalised."""

    def __init__(self, encoder: nn.Module, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled


class SequenceClassifier(nn.Module):
    """Logits of a `*ForSequenceClassification` model as a plain tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits


def check_hf_folder(path: Path) -> dict:
    """The folder's config, after checking that its weights are safetensors."""
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(f"{path} has no config.json: not a Hugging Face model folder")
    if not list(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f" (found {pickled}: pickled weights are refused; convert them to safetensors)" if pickled else ""
        )
        raise ModelSourceError(f"{path} holds no *.safetensors weights{hint}")
    return json.loads(config_path.read_text())


def infer_hf_task(config: dict) -> str:
    architectures = config.get("architectures") or []
    return "classification" if any("ForSequenceClassification" in a for a in architectures) else "embedding"


def load_hf_module(path: Path, task: str) -> nn.Module:
    """The wrapped fp32 module for `task`, built from the folder with transformers, offline."""
    from transformers import AutoModel, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = dict(local_files_only=True, use_safetensors=True, trust_remote_code=False, dtype=torch.float32)
    try:
        if task == "classification":
            return SequenceClassifier(
                AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
            ).eval()
        if task == "embedding":
            return MeanPooledEncoder(AutoModel.from_pretrained(path, **kwargs)).eval()
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"cannot load Hugging Face model from {path}: {exc}") from exc
    raise ModelSourceError(
        f"task {task!r} is not supported for Hugging Face folders; use classification or embedding"
    )


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelSourceError(f"{path}: no usable tokenizer ({exc})") from exc
