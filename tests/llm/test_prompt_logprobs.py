"""Prompt logprobs on the tiny Llama in fp32 against transformers' log_softmax at every prompt position:
whole and chunked prompts, beside decoding requests, with n > 1, after the prompt was cached."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

TEXT = "The quick brown fox jumps over the lazy dog, and then it jumps over the dog again."


@pytest.fixture(scope="module")
def reference(tiny_llama: Path) -> tuple[tuple[int, ...], torch.Tensor]:
    """The prompt's ids and transformers' fp32 log-probabilities at every position."""
    import transformers

    from inferforge.llm.detok import Tokenizer

    ids = tuple(Tokenizer(tiny_llama).encode(TEXT))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    with torch.no_grad():
        return ids, hf(torch.tensor([ids])).logits[0].log_softmax(-1)


def _engine(folder: Path, **kw) -> LLMEngine:
    return LLMEngine(folder, EngineConfig(device="cpu", dtype="float32", kv_cache_tokens=2048, **kw))


def _check(prompt_lps, ids: tuple[int, ...], lp: torch.Tensor, k: int) -> None:
    assert prompt_lps is not None and len(prompt_lps) == len(ids) - 1
    assert [t.token_id for t in prompt_lps] == list(ids[1:])
    want = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor([t.logprob for t in prompt_lps]), want, atol=1e-4)
    top_lp, top_ids = lp[:-1].topk(k, dim=-1) if k else (None, None)
    for j, t in enumerate(prompt_lps):
        assert len(t.top) == k
        if k:
            assert [i for i, _ in t.top] == top_ids[j].tolist()
            assert torch.allclose(torch.tensor([v for _, v in t.top]), top_lp[j], atol=1e-4)


@pytest.mark.parametrize("budget", [512, 16])  # the prompt in one step, and in chunks of 16 tokens
def test_prompt_logprobs_equal_transformers(tiny_llama: Path, reference, budget: int) -> None:
    ids, lp = reference
    eng = _engine(tiny_llama, max_num_batched_tokens=budget)
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=2, n=2)
    res = eng.generate([EngineRequest("p", ids, params)])["p"]
    for seq in res:  # both sequences' first outputs carry them, later outputs do not
        _check(seq[0].prompt_logprobs, ids, lp, 2)
        assert all(o.prompt_logprobs is None for o in seq[1:])


def test_beside_decoding_requests_and_after_the_prompt_was_cached(tiny_llama: Path, reference) -> None:
    """Decode rows ride in the prompt's step (its hidden rows come after theirs); the same prompt cached
    by an earlier request is computed again, since every position needs its hidden state."""
    ids, lp = reference
    eng = _engine(tiny_llama, enable_prefix_caching=True)
    eng.generate([EngineRequest("warm", ids, SamplingParams(max_tokens=1))])  # the prompt's blocks cached
    cached = eng.stats().prefix_cached_tokens_total
    for i in range(3):
        eng.add_request(EngineRequest(f"d{i}", (5, 6, 7, 8), SamplingParams(max_tokens=20, ignore_eos=True)))
    for _ in range(3):
        eng.step()
    eng.add_request(EngineRequest("p", ids, SamplingParams(max_tokens=2, prompt_logprobs=0)))
    first = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == "p" and first is None:
                first = o
    assert first is not None
    _check(first.prompt_logprobs, ids, lp, 0)
    assert eng.stats().prefix_cached_tokens_total == cached  # nothing read from the cache for it


def test_off_by_default_and_bounded() -> None:
    assert SamplingParams().prompt_logprobs is None
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)
