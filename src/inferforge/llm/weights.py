"""Load a Hugging Face folder into `DecoderLM`: meta-device build, memory-mapped safetensors, `assign=True`.

Only safetensors are read: a `.bin`/`.pt` checkpoint is a pickle and can run code when loaded, so it is
refused with a message rather than opened. Names are mapped from each family's checkpoint layout onto the
fused modules.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from inferforge.errors import ModelSourceError
from inferforge.llm.config import ModelConfig, load_config
from inferforge.llm.model import DecoderLM

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's shards; refuses folders that only hold pickled weights."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [folder / s for s in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise ModelSourceError(
            f"{folder} holds only pickled weights ({', '.join(pickles)}); "
            "inferforge never unpickles checkpoints. "
            "Convert them to safetensors (transformers: save_pretrained(..., safe_serialization=True))."
        )
    raise ModelSourceError(f"{folder} has no *.safetensors weights")


class _Checkpoint:
    """Lazy access to tensors across shards, memory-mapped by safetensors."""

    def __init__(self, files: list[Path]) -> None:
        self.handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
        self.where = {k: h for h in self.handles for k in h.keys()}  # noqa: SIM118 (safe_open is not a dict)

    def get(self, name: str) -> torch.Tensor:
        for prefix in ("", "model.", "transformer."):
            if prefix + name in self.where:
                return self.where[prefix + name].get_tensor(prefix + name)
        raise ModelSourceError(f"checkpoint is missing tensor {name!r}; is config.json from the same model?")

    def has(self, name: str) -> bool:
        return any(p + name in self.where for p in ("", "model.", "transformer."))


def _llama_state(cfg: ModelConfig, ck: _Checkpoint) -> dict[str, torch.Tensor]:
    sd = {"embed.weight": ck.get("embed_tokens.weight"), "norm.weight": ck.get("norm.weight")}
    for i in range(cfg.num_layers):
        p, a = f"layers.{i}.", f"layers.{i}.self_attn."
        sd[p + "norm1.weight"] = ck.get(p + "input_layernorm.weight")
        sd[p + "norm2.weight"] = ck.get(p + "post_attention_layernorm.weight")
        sd[p + "attn.qkv.weight"] = torch.cat([ck.get(a + f"{n}_proj.weight") for n in "qkv"])
        if cfg.qkv_bias:
            sd[p + "attn.qkv.bias"] = torch.cat([ck.get(a + f"{n}_proj.bias") for n in "qkv"])
        sd[p + "attn.o.weight"] = ck.get(a + "o_proj.weight")
        if cfg.o_bias:
            sd[p + "attn.o.bias"] = ck.get(a + "o_proj.bias")
        m = p + "mlp."
        sd[p + "mlp.up.weight"] = torch.cat([ck.get(m + "gate_proj.weight"), ck.get(m + "up_proj.weight")])
        sd[p + "mlp.down.weight"] = ck.get(m + "down_proj.weight")
        if cfg.mlp_bias:
            sd[p + "mlp.up.bias"] = torch.cat([ck.get(m + "gate_proj.bias"), ck.get(m + "up_proj.bias")])
            sd[p + "mlp.down.bias"] = ck.get(m + "down_proj.bias")
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = ck.get("lm_head.weight")
    return sd


def _gpt2_state(cfg: ModelConfig, ck: _Checkpoint) -> dict[str, torch.Tensor]:
    """GPT-2 stores Conv1D weights as [in, out]; nn.Linear wants [out, in]."""
    sd = {"embed.weight": ck.get("wte.weight"), "pos_embed.weight": ck.get("wpe.weight")}
    sd["norm.weight"], sd["norm.bias"] = ck.get("ln_f.weight"), ck.get("ln_f.bias")
    pairs = {
        "norm1": "ln_1",
        "norm2": "ln_2",
        "attn.qkv": "attn.c_attn",
        "attn.o": "attn.c_proj",
        "mlp.up": "mlp.c_fc",
        "mlp.down": "mlp.c_proj",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in pairs.items():
            w = ck.get(f"h.{i}.{theirs}.weight")
            sd[f"layers.{i}.{ours}.weight"] = w if ours.startswith("norm") else w.t().contiguous()
            sd[f"layers.{i}.{ours}.bias"] = ck.get(f"h.{i}.{theirs}.bias")
    return sd


def load_model(
    folder: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_model_len: int | None = None,
    transform: Callable[[DecoderLM], None] | None = None,
    default_cap: int | None = None,
) -> DecoderLM:
    """Build on `meta`, assign the checkpoint's tensors cast to `dtype` on `device`; `transform`
    (quantization)
    runs after loading, before anything else sees the model."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelSourceError(f"{folder} is not a model folder (expected config.json and *.safetensors)")
    cfg = load_config(folder)
    limit = cfg.context_limit()
    max_len = max_model_len or (min(limit, default_cap) if default_cap else limit)
    if max_len > limit:
        raise ModelSourceError(
            f"max_model_len {max_len} exceeds what {folder.name} supports ({limit}); lower it"
        )
    ck = _Checkpoint(safetensors_files(folder))
    raw = _gpt2_state(cfg, ck) if cfg.model_type == "gpt2" else _llama_state(cfg, ck)
    device = torch.device(device)
    state = {k: v.to(device=device, dtype=dtype) for k, v in raw.items()}
    with torch.device("meta"):
        model = DecoderLM(cfg, max_len)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelSourceError(
            f"weights do not match the architecture: missing {missing}, unexpected {unexpected}"
        )
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    model.init_rope(device, dtype)
    model.eval().requires_grad_(False)
    if transform is not None:
        transform(model)
    return model
