"""A typed view of a Hugging Face `config.json` for the decoder families this engine runs.

One dataclass for Llama, Mistral, Qwen2 and GPT-2: they differ in a handful of switches (norm, MLP, positions,
biases), so the model code branches on fields rather than on family names.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from inferforge.errors import ModelSourceError

SUPPORTED = ("llama", "mistral", "qwen2", "gpt2")
ROPE_TYPES = ("default", "linear", "llama3", "dynamic", "yarn")


@dataclass(frozen=True)
class ModelConfig:
    """The shape and switches of one decoder; built by `load_config`, validated on construction."""

    model_type: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    max_position_embeddings: int
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-6
    mlp: Literal["gated_silu", "gelu_tanh"] = "gated_silu"
    positions: Literal["rope", "learned"] = "rope"
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)
    sliding_window: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelSourceError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_kv_heads}); check config.json"
            )
        rope_type = self.rope_scaling.get("rope_type", "default")
        if self.positions == "rope" and rope_type not in ROPE_TYPES:
            raise ModelSourceError(
                f"RoPE type {rope_type!r} in config.json is not supported; supported: {', '.join(ROPE_TYPES)}"
            )

    def rope_inv_freq(self, max_model_len: int) -> list[float]:
        """Inverse frequencies after the config's scaling; mirrors transformers' rope initialisers."""
        d = self.head_dim
        inv = [1.0 / (self.rope_theta ** (i / d)) for i in range(0, d, 2)]
        scaling = self.rope_scaling
        kind = scaling.get("rope_type", "default")
        if kind == "linear":
            return [f / float(scaling["factor"]) for f in inv]
        if kind == "dynamic":
            if max_model_len > self.max_position_embeddings:
                raise ModelSourceError(
                    f"dynamic RoPE scaling is supported only up to max_position_embeddings "
                    f"({self.max_position_embeddings}); lower max_model_len (got {max_model_len})"
                )
            return inv  # transformers uses the unscaled frequencies until the original length is exceeded
        if kind == "llama3":
            factor = float(scaling["factor"])
            low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
            old_len = float(scaling["original_max_position_embeddings"])
            low_wavelen, high_wavelen = old_len / low, old_len / high
            out = []
            for f in inv:
                wavelen = 2 * math.pi / f
                if wavelen < high_wavelen:
                    out.append(f)
                elif wavelen > low_wavelen:
                    out.append(f / factor)
                else:
                    smooth = (old_len / wavelen - low) / (high - low)
                    out.append((1 - smooth) * f / factor + smooth * f)
            return out
        if kind == "yarn":
            return self._yarn_inv_freq(inv)
        return inv

    def context_limit(self) -> int:
        """The longest context this model serves: max_position_embeddings; for YaRN the original length times
        the factor where that is longer (vLLM's rule: Qwen2.5's configs keep max_position_embeddings at the
        pretrained 32,768 and reach 131,072 through YaRN x4); capped by a sliding window."""
        limit = self.max_position_embeddings
        if self.positions == "rope" and self.rope_scaling.get("rope_type") == "yarn":
            limit = max(limit, int(self._yarn_original_len() * self._yarn_factor()))
        return limit if self.sliding_window is None else min(limit, self.sliding_window)

    def rope_attention_factor(self) -> float:
        """What the cos / sin tables are multiplied by (transformers' `attention_scaling`): 1, except YaRN's
        temperature, 0.1 ln(factor) + 1 unless the config gives `attention_factor` or both mscales."""
        scaling = self.rope_scaling
        if scaling.get("rope_type", "default") != "yarn":
            return 1.0
        if scaling.get("attention_factor") is not None:
            return float(scaling["attention_factor"])
        factor = self._yarn_factor()

        def mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if m and m_all:
            return mscale(factor, float(m)) / mscale(factor, float(m_all))
        return mscale(factor)

    def _yarn_original_len(self) -> float:
        old_len = self.rope_scaling.get("original_max_position_embeddings")
        return float(old_len or self.max_position_embeddings)

    def _yarn_factor(self) -> float:
        factor = self.rope_scaling.get("factor")  # DeepSeek-V3 style configs leave it to the two lengths
        if factor is None:
            return self.max_position_embeddings / self._yarn_original_len()
        return float(factor)

    def _yarn_inv_freq(self, inv: list[float]) -> list[float]:
        """YaRN (arXiv 2309.00071), as transformers' `_compute_yarn_parameters`: dimensions that rotate fewer
        than `beta_slow` times over the original length are interpolated (divided by the factor), those that
        rotate more than `beta_fast` times are kept, and a linear ramp blends the ones between."""
        scaling, d, base = self.rope_scaling, self.head_dim, self.rope_theta
        factor, old_len = self._yarn_factor(), self._yarn_original_len()
        fast, slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

        def dim_for(rotations: float) -> float:
            return d * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = dim_for(fast), dim_for(slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, d - 1)
        if low == high:
            high += 0.001  # as transformers: no division by zero
        out = []
        for i, f in enumerate(inv):
            keep = 1.0 - min(max((i - low) / (high - low), 0.0), 1.0)  # 1: extrapolate, 0: interpolate
            out.append(f / factor * (1.0 - keep) + f * keep)
        return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelSourceError(f"{path} not found: a model folder needs config.json") from None
    except json.JSONDecodeError as exc:
        raise ModelSourceError(f"{path} is not valid JSON: {exc}") from None


def _eos_ids(raw: dict[str, Any], folder: Path) -> tuple[int, ...]:
    ids: list[int] = []
    sources = [raw.get("eos_token_id")]
    gen = folder / "generation_config.json"
    if gen.exists():
        sources.append(_read_json(gen).get("eos_token_id"))
    for value in sources:
        for i in value if isinstance(value, list) else [value]:
            if isinstance(i, int) and i not in ids:
                ids.append(i)
    return tuple(ids)


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """transformers 5 writes `rope_parameters`; older folders write `rope_theta` and `rope_scaling`."""
    params = dict(raw.get("rope_parameters") or {})
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    scaling = dict(raw.get("rope_scaling") or {}) or params
    if "type" in scaling and "rope_type" not in scaling:
        scaling["rope_type"] = scaling.pop("type")
    return theta, scaling


def load_config(folder: str | Path) -> ModelConfig:
    """Parse `folder/config.json`; refuse families we do not implement and anything needing remote code."""
    folder = Path(folder)
    raw = _read_json(folder / "config.json")
    if "auto_map" in raw:
        raise ModelSourceError(
            f"{folder}/config.json asks for custom repository code (auto_map); inferforge never runs it. "
            "Use a model whose architecture transformers ships natively."
        )
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED:
        raise ModelSourceError(
            f"model_type {model_type!r} in {folder}/config.json is not supported; "
            f"supported: {', '.join(SUPPORTED)}"
        )
    eos = _eos_ids(raw, folder)
    if model_type == "gpt2":
        hidden = raw["n_embd"]
        return ModelConfig(
            model_type="gpt2",
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            num_layers=raw["n_layer"],
            num_heads=raw["n_head"],
            num_kv_heads=raw["n_head"],
            head_dim=hidden // raw["n_head"],
            intermediate_size=raw.get("n_inner") or 4 * hidden,
            max_position_embeddings=raw["n_positions"],
            norm="layer",
            norm_eps=raw.get("layer_norm_epsilon", 1e-5),
            mlp="gelu_tanh",
            positions="learned",
            qkv_bias=True,
            o_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
            eos_token_ids=eos,
        )
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelSourceError(f"hidden_act {raw.get('hidden_act')!r} is not supported; only silu")
    theta, scaling = _rope(raw)
    heads = raw["num_attention_heads"]
    use_window = raw.get("use_sliding_window", model_type == "mistral")
    return ModelConfig(
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
        intermediate_size=raw["intermediate_size"],
        max_position_embeddings=raw.get("max_position_embeddings", 2048),
        norm_eps=raw.get("rms_norm_eps", 1e-6),
        qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
        o_bias=bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=raw.get("sliding_window") if use_window else None,
        eos_token_ids=eos,
    )
