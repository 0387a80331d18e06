"""The CUDA paths (graphs, Triton decode kernel, gemlite int8). Skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

pytestmark = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_triton_decode_kernel_matches_reference() -> None:
    from inferforge.llm import triton_attn

    assert triton_attn.check_against_reference(torch.device("cuda")) < 2e-2


@needs_cuda
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_cuda_graph_greedy_fp32_matches_transformers(tiny_dirs: dict[str, Path], family: str) -> None:
    from transformers import AutoModelForCausalLM

    folder = tiny_dirs[family]
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = (5, 17, 99, 3)
    ref = hf.generate(
        torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0
    )
    eng = LLMEngine(
        folder, EngineConfig(device="cuda", dtype="float32", kv_cache_tokens=2048, max_num_seqs=4)
    )
    assert eng.runner.graphs, "decode graphs were not captured"
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    outs = eng.generate([EngineRequest("g", prompt, params)])["g"][0]
    assert [t for o in outs for t in o.new_token_ids] == ref[0, len(prompt) :].tolist()


@needs_cuda
def test_int8_engine_runs_and_stays_close_to_bf16(tiny_llama: Path) -> None:
    prompt = (5, 17, 99, 3)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=0)
    base = LLMEngine(tiny_llama, EngineConfig(device="cuda", kv_cache_tokens=1024, max_num_seqs=2))
    q8 = LLMEngine(
        tiny_llama, EngineConfig(device="cuda", quant="int8", kv_cache_tokens=1024, max_num_seqs=2)
    )
    a = base.generate([EngineRequest("a", prompt, params)])["a"][0]
    b = q8.generate([EngineRequest("b", prompt, params)])["b"][0]
    assert a[0].logprobs and b[0].logprobs
    assert abs(a[0].logprobs[0].logprob - b[0].logprobs[0].logprob) < 0.1


@needs_cuda
def test_argmax_inside_the_graph_gives_the_samplers_tokens(
    tiny_llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy steps read the argmax the decode graph took; with it off the sampler takes it: the same tokens
    for a batch of greedy requests, a request alone, and a batch that mixes in seeded sampling (which must
    still go through the sampler)."""
    greedy = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True)
    batches = [
        [EngineRequest(f"g{i}", (5 + i, 17, 99, 3 + i), greedy) for i in range(6)],
        [EngineRequest("alone", (8, 6, 4), greedy)],
        [
            EngineRequest("s", (9, 9, 2), seeded),
            *(EngineRequest(f"m{i}", (1 + i, 2, 3), greedy) for i in range(3)),
        ],
    ]
    from inferforge.llm import engine as engine_module

    calls = {True: 0, False: 0}
    real_sample = engine_module.sample
    tokens: dict[bool, list] = {}
    for on in (True, False):

        def counted(*args, on=on, **kwargs):
            calls[on] += 1
            return real_sample(*args, **kwargs)

        monkeypatch.setattr(engine_module, "sample", counted)
        config = EngineConfig(device="cuda", kv_cache_tokens=2048, max_num_seqs=8, graph_argmax=on)
        eng = LLMEngine(tiny_llama, config)
        assert all((ids is not None) == on for _, _, ids in eng.runner.graphs.values())
        tokens[on] = [
            {rid: [t for o in seq for t in o.new_token_ids] for rid, (seq,) in eng.generate(reqs).items()}
            for reqs in batches
        ]
    assert tokens[True] == tokens[False]
    assert calls[True] < calls[False] / 2  # the greedy decode steps skipped the sampler
