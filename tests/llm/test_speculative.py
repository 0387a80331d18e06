"""Speculative decoding by prompt lookup (`speculative.py`) on the tiny Llama (CPU, fp32): the tokens are
exactly greedy decoding's, drafts are proposed and accepted, and requests it does not apply to decode as
usual beside it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inferforge.errors import InferforgeError
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.speculative import accepted, propose

GREEDY = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
# The tiny model falls into a loop after (100, 200, 300): lookups find it; the others repeat their prompts.
PROMPTS = [(100, 200, 300), (5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6, 7), (30, 31, 32, 33, 30, 31, 32)]


def test_propose_takes_what_followed_the_latest_longest_match() -> None:
    t = np.array([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3])
    assert propose(t, 3, 2, 4) == [7, 8, 5]  # (1, 2, 3) last seen at 4: what followed it there
    assert propose(t, 10, 2, 4) == [7, 8, 5, 1, 2, 3]  # never past the sequence's end
    assert propose(np.array([4, 5, 6, 7]), 3, 2, 4) == []  # nothing repeats
    assert propose(np.array([4, 5, 4, 6, 4]), 2, 1, 3) == [6, 4]  # a 1-gram when longer ones fail
    assert propose(np.array([4, 5, 4, 6, 4]), 2, 2, 3) == []


def test_accepted_keeps_agreeing_drafts_then_the_model_s_token() -> None:
    assert accepted([7, 8, 5], [7, 8, 5, 4]) == [7, 8, 5, 4]  # all agree: the bonus token too
    assert accepted([7, 8, 5], [7, 2, 5, 4]) == [7, 2]  # stops at the first difference
    assert accepted([], [9]) == [9]


def _tokens(eng: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[int]]:
    res = eng.generate(reqs)
    return {rid: [t for o in seqs[0] for t in o.new_token_ids] for rid, seqs in res.items()}


def _engine(folder: Path, spec: int, **kw: object) -> LLMEngine:
    cfg = EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, speculative_tokens=spec, **kw)  # type: ignore[arg-type]
    return LLMEngine(folder, cfg)


@pytest.mark.parametrize("overlap", [True, False])
def test_speculative_tokens_are_greedy_decoding_s(tiny_llama: Path, overlap: bool) -> None:
    reqs = [EngineRequest(f"g{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    plain = _tokens(_engine(tiny_llama, 0, overlap_decode=overlap), reqs)
    spec_engine = _engine(tiny_llama, 4, overlap_decode=overlap)
    res = spec_engine.generate(reqs)
    got = {rid: [t for o in seqs[0] for t in o.new_token_ids] for rid, seqs in res.items()}
    stats = spec_engine.stats()
    assert got == plain and all(len(t) == 60 for t in got.values())
    # the loop after (100, 200, 300) is one token repeated: each lookup copies what follows the last match,
    # so a draft is as long as the run so far; a few are accepted (6 on the CPU box)
    assert stats.spec_accepted_tokens_total >= 4
    assert stats.spec_draft_tokens_total >= stats.spec_accepted_tokens_total
    # several tokens in one step come as one delta: fewer outputs than tokens
    assert sum(len(seqs[0]) for seqs in res.values()) < 180
    assert stats.generated_tokens_total == 180 and stats.kv_blocks_used == 0


def test_stops_and_limits_cut_accepted_drafts(tiny_llama: Path, engine: LLMEngine) -> None:
    loop = PROMPTS[0]
    base = _tokens(_engine(tiny_llama, 0), [EngineRequest("b", loop, GREEDY)])["b"]
    stop_id = base[7]  # inside the loop the drafts run through
    reqs = [
        EngineRequest("len", loop, replace(GREEDY, max_tokens=9)),
        EngineRequest("ids", loop, replace(GREEDY, stop_token_ids=(stop_id,))),
        EngineRequest("txt", loop, replace(GREEDY, stop=(engine.tokenizer.decode(base[5:7]),))),
    ]
    assert _tokens(_engine(tiny_llama, 4), reqs) == _tokens(_engine(tiny_llama, 0), reqs)


def test_requests_it_does_not_apply_to_decode_as_usual_beside_it(tiny_llama: Path) -> None:
    sampled = EngineRequest("s", (40, 41, 42), replace(GREEDY, temperature=0.8, seed=3))
    with_lp = EngineRequest("l", (50, 51), replace(GREEDY, logprobs=2))
    reqs = [EngineRequest("g", PROMPTS[0], GREEDY), sampled, with_lp]
    assert _tokens(_engine(tiny_llama, 4), reqs) == _tokens(_engine(tiny_llama, 0), reqs)


def test_with_preemption_and_a_one_token_step_budget(tiny_llama: Path) -> None:
    reqs = [EngineRequest(f"p{i}", p, GREEDY) for i, p in enumerate(PROMPTS)]
    small = dict(kv_cache_tokens=96, max_num_seqs=4)
    plain = _tokens(LLMEngine(tiny_llama, EngineConfig(max_num_batched_tokens=16, **small)), reqs)  # type: ignore[arg-type]
    eng = LLMEngine(tiny_llama, EngineConfig(max_num_batched_tokens=4, speculative_tokens=4, **small))  # type: ignore[arg-type]
    assert _tokens(eng, reqs) == plain
    assert eng.stats().preemptions_total >= 1 and eng.stats().kv_blocks_used == 0


def test_bad_settings_are_refused() -> None:
    with pytest.raises(InferforgeError, match="speculative_tokens"):
        EngineConfig(speculative_tokens=-1)
    with pytest.raises(InferforgeError, match="speculative_max_batch"):
        EngineConfig(speculative_tokens=2, speculative_max_batch=0)
