"""Tiny Hugging Face model folders for tests: real tokenizer, random weights from a fixed seed.

Tests and the server's end-to-end checks need a model that loads exactly like a downloaded one (config.json,
safetensors, tokenizer.json, a chat template) but builds in a second, offline. Weights are random, so use
these for correctness and plumbing, never for quality.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Any, Literal

Family = Literal["llama", "qwen2", "gpt2"]

SPECIAL_TOKENS = ("<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
_CORPUS_MODULES = ("textwrap", "json/__init__", "argparse", "string", "functools", "collections/__init__")


def stdlib_docstrings(modules: tuple[str, ...] = _CORPUS_MODULES) -> list[str]:
    """Docstrings of a few standard-library modules: text that ships with Python, so training is offline."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    for name in modules:
        tree = ast.parse((root / f"{name}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc:
                    texts.append(doc)
    return texts


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> int:
    """Train a byte-level BPE on stdlib docstrings, save it with a chat template; return the vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_docstrings(), trainer=trainer)
    tok.save(str(out_dir / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 256,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2), encoding="utf-8")
    special = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    return tok.get_vocab_size()


def _hf_config(family: Family, vocab_size: int, eos_id: int):  # -> transformers.PretrainedConfig
    import transformers

    ids: dict[str, Any] = {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": eos_id}
    common: dict[str, Any] = {"vocab_size": vocab_size, **ids}
    if family == "gpt2":
        return transformers.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **common
        )
    shape: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "max_position_embeddings": 256,
        "initializer_range": 0.2,
        "rms_norm_eps": 1e-5,
    }
    if family == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=False, **shape, **common)
    # Llama 3 style: tied embeddings and llama3 RoPE scaling that bites within the tiny context.
    rope: dict[str, Any] = {
        "rope_type": "llama3",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    return transformers.LlamaConfig(tie_word_embeddings=True, rope_parameters=rope, **shape, **common)


def make_tiny_llama(out_dir: str | Path, *, family: Family = "llama", seed: int = 0) -> Path:
    """Write a tiny model folder (`family` is llama, qwen2 or gpt2) and return its path.

    Same seed, same bytes: tests can build it in a temporary folder instead of shipping binaries.
    """
    import torch
    import transformers

    if family not in ("llama", "qwen2", "gpt2"):
        raise ValueError(f"family must be one of llama, qwen2, gpt2; got {family!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab_size = train_tokenizer(out)
    eos_id = 0  # "<|endoftext|>" is the first special token
    config = _hf_config(family, vocab_size, eos_id)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = eos_id
    model.save_pretrained(out, safe_serialization=True)
    return out
