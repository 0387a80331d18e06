"""KV blocks as sequences grow, and preemption by recompute when they run out (tiny Llama, CPU, fp32).

What must hold: a preempted request, computed again from its prompt and the tokens it had generated, goes on
with exactly the tokens it would have produced had it never stopped (greedy and seeded sampling), every block
comes back, and aborting a request while it waits after a preemption ends it cleanly."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
PROMPTS = ["The object", "class", "Return", "If the argument"]


def _small(tiny_llama: Path, **kw: object) -> LLMEngine:
    """4 usable blocks of 16 tokens: two sequences of ~45 tokens cannot both finish without a preemption."""
    cfg = EngineConfig(kv_cache_tokens=80, max_num_seqs=8, max_num_batched_tokens=64, **kw)  # type: ignore[arg-type]
    return LLMEngine(tiny_llama, cfg)


def _drain(eng: LLMEngine, got: dict[str, list[int]], reasons: dict[str, str | None]) -> int:
    """Step to the end; returns the largest number of requests that ran together."""
    most = 0
    while eng.has_unfinished():
        for out in eng.step():
            got[out.request_id].extend(out.new_token_ids)
            if out.finished:
                reasons[out.request_id] = out.finish_reason
        most = max(most, eng.stats().running)
    return most


def _alone(engine: LLMEngine, req: EngineRequest) -> list[int]:
    outs = engine.generate([req])[req.request_id][0]
    return [t for o in outs for t in o.new_token_ids]


@pytest.mark.parametrize("overlap", [True, False])
def test_preempted_requests_finish_with_the_tokens_they_would_have_made(
    tiny_llama: Path, engine: LLMEngine, overlap: bool
) -> None:
    small = _small(tiny_llama, overlap_decode=overlap)
    seeded = replace(GREEDY, temperature=0.9, top_p=0.95, seed=7)
    reqs = [
        EngineRequest(f"p{i}", tuple(engine.tokenizer.encode(p)), GREEDY if i % 2 else seeded)
        for i, p in enumerate(PROMPTS)
    ]
    for r in reqs:
        small.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    reasons: dict[str, str | None] = {}
    most = _drain(small, got, reasons)
    stats = small.stats()
    assert stats.preemptions_total >= 1 and stats.recomputed_tokens_total > 0
    assert most >= 3  # admitted with their prompt's blocks, not 40 tokens' worth each (2 would fit)
    assert got == {r.request_id: _alone(engine, r) for r in reqs}
    assert all(len(t) == 40 for t in got.values()) and set(reasons.values()) == {"length"}
    assert stats.kv_blocks_used == 0 and stats.running == 0 and stats.waiting == 0


def test_reserving_whole_budgets_admits_fewer_and_never_preempts(tiny_llama: Path, engine: LLMEngine) -> None:
    small = _small(tiny_llama, reserve_full_budget=True)
    reqs = [EngineRequest(f"r{i}", tuple(engine.tokenizer.encode(p)), GREEDY) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        small.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    most = _drain(small, got, {})
    assert most == 1  # prompt + 40 tokens is 3 blocks of the 4: one request at a time
    assert small.stats().preemptions_total == 0
    assert got == {r.request_id: _alone(engine, r) for r in reqs}


def test_aborting_a_preempted_request_while_it_waits(tiny_llama: Path, engine: LLMEngine) -> None:
    small = _small(tiny_llama)
    reqs = [EngineRequest(f"a{i}", tuple(engine.tokenizer.encode(p)), GREEDY) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        small.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    reasons: dict[str, str | None] = {}
    victim = None
    for _ in range(200):
        for out in small.step():
            got[out.request_id].extend(out.new_token_ids)
        waiting = [r for r in small.scheduler.waiting if r.preemptions]
        if waiting:
            victim = waiting[0].request.request_id
            break
    assert victim is not None, "no request was preempted"
    (out,) = small.abort(victim)
    assert out.finished and out.finish_reason == "abort"
    _drain(small, got, reasons)
    assert victim not in reasons  # nothing more came for it after the abort
    for r in reqs:
        if r.request_id != victim:
            assert reasons[r.request_id] == "length" and got[r.request_id] == _alone(engine, r)
    assert small.stats().kv_blocks_used == 0


def test_n_greater_than_one_keeps_its_reservation_beside_growing_requests(
    tiny_llama: Path, engine: LLMEngine
) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=160, max_num_seqs=8, max_num_batched_tokens=64))
    ids = tuple(engine.tokenizer.encode("Return"))
    pair = EngineRequest("n2", ids, replace(GREEDY, n=2, max_tokens=30))
    singles = [
        EngineRequest(f"s{i}", tuple(engine.tokenizer.encode(p)), GREEDY) for i, p in enumerate(PROMPTS)
    ]
    for r in [pair, *singles]:
        eng.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in singles}
    pair_tokens: dict[int, list[int]] = {0: [], 1: []}
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == "n2":
                pair_tokens[out.index].extend(out.new_token_ids)
            else:
                got[out.request_id].extend(out.new_token_ids)
    alone_pair = engine.generate([pair])["n2"]
    assert pair_tokens == {i: [t for o in alone_pair[i] for t in o.new_token_ids] for i in (0, 1)}
    assert got == {r.request_id: _alone(engine, r) for r in singles}
    assert eng.stats().preemptions_total >= 1 and eng.stats().kv_blocks_used == 0


def test_a_readmitted_request_reads_its_own_cached_blocks(tiny_llama: Path, engine: LLMEngine) -> None:
    """With prefix caching, the blocks a preempted request had filled (prompt and generated) stay cached
    until another allocation takes them, so readmitted it recomputes fewer tokens; the tokens are the same."""
    reqs = [EngineRequest(f"c{i}", tuple(engine.tokenizer.encode(p)), GREEDY) for i, p in enumerate(PROMPTS)]
    runs = {}
    for caching in (False, True):
        eng = _small(tiny_llama, enable_prefix_caching=caching)
        runs[caching] = (_tokens(eng, reqs), eng.stats())
    (off, off_stats), (on, on_stats) = runs[False], runs[True]
    assert off == on and off_stats.preemptions_total >= 1 and on_stats.preemptions_total >= 1
    assert on_stats.recomputed_tokens_total < off_stats.recomputed_tokens_total


def _tokens(eng: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[int]]:
    res = eng.generate(reqs)
    return {rid: [t for o in seqs[0] for t in o.new_token_ids] for rid, seqs in res.items()}


@pytest.mark.parametrize("overlap", [True, False])
def test_preempted_structured_requests_keep_their_grammar_state(
    tiny_llama: Path, engine: LLMEngine, overlap: bool
) -> None:
    """A preempted request computes its prompt and output again, but its grammar has already consumed the
    output: its next tokens must follow on as if it had never left (the same as alone, and valid JSON)."""
    import json

    from inferforge.llm.protocol import StructuredOutput

    digits = {"type": "integer", "minimum": 0, "maximum": 9}
    array = {"type": "array", "items": digits, "minItems": 12, "maxItems": 12}
    schema = {"type": "object", "properties": {"a": array}, "required": ["a"], "additionalProperties": False}
    spec = StructuredOutput("json_schema", json.dumps(schema))
    params = SamplingParams(max_tokens=60, temperature=0.0, structured=spec)
    small = _small(tiny_llama, overlap_decode=overlap)
    reqs = [EngineRequest(f"s{i}", tuple(engine.tokenizer.encode(p)), params) for i, p in enumerate(PROMPTS)]
    for r in reqs:
        small.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    reasons: dict[str, str | None] = {}
    _drain(small, got, reasons)
    assert small.stats().preemptions_total >= 1
    assert got == {r.request_id: _alone(engine, r) for r in reqs}
    for ids in got.values():
        assert len(json.loads(engine.tokenizer.decode(ids))["a"]) == 12
    assert set(reasons.values()) == {"stop"}
