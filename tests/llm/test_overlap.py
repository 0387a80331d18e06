"""Overlapped decode (the next step launched before this one is read back) changes nothing a client sees."""

from __future__ import annotations

from pathlib import Path

import pytest

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def _texts(engine: LLMEngine, reqs: list[EngineRequest], arrive_every: int = 0) -> dict:
    """Per request and sequence: (token ids, text, finish reason); a request joins every `arrive_every`
    steps."""
    out: dict = {r.request_id: [[[], "", None] for _ in range(r.params.n)] for r in reqs}
    pending, steps = list(reqs), 0
    while pending or engine.has_unfinished():
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            engine.add_request(pending.pop(0))
            continue
        for o in engine.step():
            row = out[o.request_id][o.index]
            row[0] += o.new_token_ids
            row[1] += o.new_text
            row[2] = o.finish_reason
        steps += 1
    return out


@pytest.mark.parametrize("arrive_every", [0, 3])
def test_overlapped_equals_plain(tiny_llama: Path, arrive_every: int) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=32))
    greedy = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    stops = SamplingParams(max_tokens=30, temperature=0.0, stop=["e"], ignore_eos=True)
    sampled = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, n=2)
    eos = SamplingParams(max_tokens=40, temperature=0.0)
    text = tuple(eng.tokenizer.encode("The object of this module"))
    reqs = [
        EngineRequest("greedy", text, greedy),
        EngineRequest("stops", text[:3], stops),
        EngineRequest("sampled", text[1:], sampled),
        EngineRequest("eos", text[2:], eos),
    ]
    overlapped = _texts(eng, reqs, arrive_every)
    assert eng.stats().kv_blocks_used == 0
    plain = LLMEngine(
        tiny_llama, EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=32, overlap_decode=False)
    )
    assert overlapped == _texts(plain, reqs, arrive_every)
    assert overlapped["stops"][0][2] == "stop" and overlapped["greedy"][0][2] == "length"


def test_overlap_engages_through_arrivals_and_finishes(tiny_llama: Path) -> None:
    """Requests join every 4 steps and leave at different lengths; nearly every step must still find the
    previous one in flight (only the first step and the drain at the end may not)."""
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096))
    pending = [
        EngineRequest(
            str(i), (5 + i, 6, 7), SamplingParams(max_tokens=10 + 3 * i, temperature=0.0, ignore_eos=True)
        )
        for i in range(6)
    ]
    in_flight_at_start = steps = 0
    while pending or eng.has_unfinished():
        if pending and steps % 4 == 0:
            eng.add_request(pending.pop(0))
        in_flight_at_start += eng._inflight is not None
        eng.step()
        steps += 1
    assert in_flight_at_start >= steps - 3


def test_logprobs_and_penalty_requests_make_steps_plain(tiny_llama: Path) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096))
    plain = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096, overlap_decode=False))
    reqs = [
        EngineRequest("lp", (5, 6, 7), SamplingParams(max_tokens=12, temperature=0.0, logprobs=2)),
        EngineRequest(
            "pen", (9, 6, 7), SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3)
        ),
        EngineRequest("g", (8, 6), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)),
    ]

    def content(res: dict) -> dict:
        return {
            rid: [[(o.new_token_ids, o.new_text, o.logprobs, o.finish_reason) for o in outs] for outs in seqs]
            for rid, seqs in res.items()
        }

    got, want = content(eng.generate(reqs)), content(plain.generate(reqs))
    assert got == want and got["lp"][0][0][2]
    assert eng._inflight is None and eng.stats().kv_blocks_used == 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_mixed_chunked_steps_equal_alone_for_every_family(tiny_dirs: dict[str, Path], family: str) -> None:
    """Requests join every 3 steps under a 12-token budget: steps mix decode rows with prompt chunks (one
    pass) and chunks continue over later steps; each request must generate what it generates alone."""
    eng = LLMEngine(
        tiny_dirs[family], EngineConfig(kv_cache_tokens=4096, max_num_seqs=8, max_num_batched_tokens=12)
    )
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"m{i}", tuple(range(30 + 7 * i, 40 + 9 * i)), params) for i in range(5)]
    alone = {
        r.request_id: [t for o in eng.generate([r])[r.request_id][0] for t in o.new_token_ids] for r in reqs
    }
    got = _texts(eng, reqs, arrive_every=3)
    assert {rid: rows[0][0] for rid, rows in got.items()} == alone
