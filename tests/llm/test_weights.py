"""Loading and greedy equality with transformers (fp32, CPU) for each supported family."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from inferforge.errors import ModelSourceError
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.weights import load_model

PROMPTS = ("Return a new list of the lines", "The object is", "class")


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_greedy_matches_transformers(tiny_dirs: dict[str, Path], family: str) -> None:
    _assert_greedy_matches_transformers(tiny_dirs[family], family)


def _assert_greedy_matches_transformers(folder: Path, label: str) -> None:
    """40 greedy tokens for each of `PROMPTS`, batched through the engine, equal transformers' `generate`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    engine = LLMEngine(folder, EngineConfig(kv_cache_tokens=2048, max_num_batched_tokens=64))
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"r{i}", tuple(tok.encode(p)), params) for i, p in enumerate(PROMPTS)]
    results = engine.generate(reqs)
    for r in reqs:
        ours = [t for out in results[r.request_id][0] for t in out.new_token_ids]
        ref = hf.generate(
            torch.tensor([r.prompt_ids]),
            max_new_tokens=40,
            min_new_tokens=40,
            do_sample=False,
            pad_token_id=0,
        )[0, len(r.prompt_ids) :].tolist()
        assert ours == ref, f"{label} prompt {r.request_id}"


def test_refuses_pickle_checkpoints(tmp_path: Path, tiny_llama: Path) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not opened")
    with pytest.raises(ModelSourceError, match="pickle"):
        load_model(tmp_path)


def test_refuses_remote_code_and_unknown_families(tmp_path: Path, tiny_llama: Path) -> None:
    raw = json.loads((tiny_llama / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "auto_map": {"AutoModel": "x.Y"}}))
    with pytest.raises(ModelSourceError, match=r"remote|repository code"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "bert"}))
    with pytest.raises(ModelSourceError, match="bert"):
        load_model(tmp_path)


def test_max_model_len_beyond_the_model_is_refused(tiny_llama: Path) -> None:
    with pytest.raises(ModelSourceError, match="max_model_len"):
        load_model(tiny_llama, max_model_len=100_000)


def test_quant_formats_off_gpu_are_refused_early(tiny_llama: Path) -> None:
    from inferforge.errors import NotApplicable

    for fmt in ("int8", "fp8", "int4"):
        with pytest.raises(NotApplicable, match="CUDA"):
            LLMEngine(tiny_llama, EngineConfig(quant=fmt, kv_cache_tokens=256))  # type: ignore[arg-type]


def test_config_variants_mistral_window_and_rope_scaling(tmp_path: Path, tiny_llama: Path) -> None:
    from inferforge.llm.config import load_config

    raw = json.loads((tiny_llama / "config.json").read_text())
    mistral = {**raw, "model_type": "mistral", "sliding_window": 32, "rope_parameters": None}
    mistral["rope_theta"] = 1e4
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    cfg = load_config(tmp_path)
    assert cfg.sliding_window == 32 and cfg.rope_scaling == {} and not cfg.qkv_bias
    old_style = {**raw, "rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(old_style))
    cfg = load_config(tmp_path)
    assert cfg.rope_inv_freq(64)[1] == pytest.approx(cfg.rope_theta ** (-2 / cfg.head_dim) / 4.0)
    dynamic = {**raw, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(dynamic))
    with pytest.raises(ModelSourceError, match="dynamic"):
        load_config(tmp_path).rope_inv_freq(10_000)
    longrope = {**raw, "rope_parameters": {"rope_type": "longrope", "factor": 2.0, "rope_theta": 1e4}}
    (tmp_path / "config.json").write_text(json.dumps(longrope))
    with pytest.raises(ModelSourceError, match="longrope"):
        load_config(tmp_path)


# YaRN as Qwen2.5's long-context configs and DeepSeek-style ones write it; lengths small enough that the
# interpolated, blended and kept dimensions all occur within the tiny models' 16-wide heads.
YARN = [
    {"factor": 4.0, "original_max_position_embeddings": 64},
    {"factor": 2.0, "original_max_position_embeddings": 128, "beta_fast": 16, "beta_slow": 2},
    {"factor": 8.0, "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 1.0},
    {"factor": 4.0, "original_max_position_embeddings": 64, "attention_factor": 1.3, "truncate": False},
]


def _with_rope(src: Path, dst: Path, params: dict) -> Path:
    shutil.copytree(src, dst)
    raw = json.loads((dst / "config.json").read_text())
    theta = (raw.get("rope_parameters") or {}).get("rope_theta", raw.get("rope_theta", 10000.0))
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": theta, **params}
    raw.pop("rope_scaling", None)
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.mark.parametrize("params", YARN)
def test_rope_yarn_matches_transformers(tiny_llama: Path, tmp_path: Path, params: dict) -> None:
    """Inverse frequencies and the cos / sin temperature (`attention_scaling`) equal transformers' YaRN."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from inferforge.llm.config import load_config

    folder = _with_rope(tiny_llama, tmp_path / "yarn", params)
    ref, ref_scale = ROPE_INIT_FUNCTIONS["yarn"](AutoConfig.from_pretrained(folder), "cpu")
    cfg = load_config(folder)
    ours = torch.tensor(cfg.rope_inv_freq(256), dtype=torch.float32)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    assert cfg.rope_attention_factor() == pytest.approx(ref_scale, rel=1e-12)
    assert not torch.allclose(ours, torch.tensor(cfg.rope_theta ** (-torch.arange(0, 16, 2) / 16.0)).float())


def test_yarn_extends_the_context_to_the_original_length_times_the_factor(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """As vLLM: 32 original positions x 8 = 256 here, the tiny model's max_position_embeddings; x 16 = 512
    goes past it, and the tables cover it."""
    folder = _with_rope(tiny_llama, tmp_path / "yarn16", {**YARN[2], "factor": 16.0})
    model = load_model(folder, max_model_len=512)
    assert model.max_model_len == 512 and model.rope_cos.shape[0] == 512
    with pytest.raises(ModelSourceError, match="max_model_len 513 exceeds"):
        load_model(folder, max_model_len=513)


def test_greedy_with_yarn_matches_transformers(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """A Qwen2 with YaRN (its long-context recipe) generates transformers' greedy tokens in fp32: the
    temperature scales every attention logit, so a missing one shows at once."""
    folder = _with_rope(tiny_dirs["qwen2"], tmp_path / "qwen2_yarn", YARN[2])
    _assert_greedy_matches_transformers(folder, "qwen2 with YaRN")


def test_rope_llama3_matches_transformers(tiny_llama: Path) -> None:
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from inferforge.llm.config import load_config

    hf_cfg = AutoConfig.from_pretrained(tiny_llama)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    ours = torch.tensor(load_config(tiny_llama).rope_inv_freq(256), dtype=torch.float32)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
