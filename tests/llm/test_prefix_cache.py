"""Prefix caching: KV blocks of a prompt's full 16-token blocks reused by later prompts that start with the
same tokens (`EngineConfig.enable_prefix_caching`), on the tiny Llama (CPU, fp32) and the allocator alone."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import pytest

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.kv_cache import BlockAllocator, prompt_block_keys
from inferforge.llm.protocol import EngineRequest, SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PREFIX = tuple(range(40, 80))  # 40 tokens: two full blocks and 8 more


def _engine(folder: Path, caching: bool, tokens: int = 4096) -> LLMEngine:
    cfg = EngineConfig(kv_cache_tokens=tokens, max_num_batched_tokens=64, enable_prefix_caching=caching)
    return LLMEngine(folder, cfg)


def _tokens(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[int]]:
    res = engine.generate(reqs)
    return {rid: [t for o in seqs[0] for t in o.new_token_ids] for rid, seqs in res.items()}


def test_keys_digest_the_whole_prefix() -> None:
    a, b = prompt_block_keys(tuple(range(40))), prompt_block_keys((99, *tuple(range(1, 40))))
    assert len(a) == 2 and a[0] != b[0] and a[1] != b[1]  # the second block's tokens agree, its prefix not
    assert prompt_block_keys(tuple(range(33)))[:2] == a
    first = hashlib.blake2b(b"".join(t.to_bytes(4, "little") for t in range(16)), digest_size=16).digest()
    assert a[0] == first  # the key format: int32 little-endian tokens, chained 16-byte BLAKE2b


def test_allocator_keeps_freed_prefix_blocks_until_needed() -> None:
    alloc = BlockAllocator(5)  # blocks 1-4
    first = alloc.allocate(2)
    kept = first[0]
    alloc.register(kept, b"k0")
    alloc.free(first)
    assert alloc.num_free == 4 and alloc.match([b"k0", b"k1"]) == [kept]
    assert alloc.can_allocate(3, reuse=[kept]) and not alloc.can_allocate(4, reuse=[kept])
    alloc.acquire([kept])
    alloc.acquire([kept])  # two users
    assert alloc.num_used == 1
    alloc.free([kept])
    assert alloc.num_used == 1  # one user left
    alloc.free([kept])
    taken = alloc.allocate(4)  # needs every block: the cached one is evicted
    assert sorted(taken) == [1, 2, 3, 4] and alloc.match([b"k0"]) == []


def test_shared_prefix_is_reused_and_outputs_are_unchanged(tiny_llama: Path) -> None:
    prompts = [(*PREFIX, 7, 8, 9), (*PREFIX, 10), PREFIX, PREFIX[:32]]
    reqs = [EngineRequest(f"r{i}", p, GREEDY) for i, p in enumerate(prompts)]
    want = {r.request_id: _tokens(_engine(tiny_llama, False), [r])[r.request_id] for r in reqs}
    eng = _engine(tiny_llama, True)
    got = {}
    for r in reqs:  # one after another: each finds the blocks the first one computed
        got.update(_tokens(eng, [r]))
    assert got == want
    # r1 (41 tokens) and r2 (40) reuse both full blocks; r3 (32 tokens) one: its last token must be computed
    # for its logits, so the block holding it is computed again
    assert eng.stats().prefix_cached_tokens_total == 32 + 32 + 16
    assert eng.stats().kv_blocks_used == 0


def test_requests_sharing_blocks_while_running_and_aborted(tiny_llama: Path) -> None:
    eng = _engine(tiny_llama, True)
    long = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    first = EngineRequest("first", (*PREFIX, 1, 2), long)
    second = EngineRequest("second", (*PREFIX, 3, 4), GREEDY)
    want = _tokens(_engine(tiny_llama, False), [second])["second"]
    eng.add_request(first)
    for _ in range(4):  # first's prompt is computed and its blocks registered
        eng.step()
    eng.add_request(second)
    got: list[int] = []
    while eng.has_unfinished():
        for out in eng.step():
            if out.request_id == "second":
                got.extend(out.new_token_ids)
            if out.request_id == "first" and out.completion_tokens >= 20:
                eng.abort("first")
    assert got == want and eng.stats().prefix_cached_tokens_total == 32
    assert eng.stats().kv_blocks_used == 0


def test_eviction_under_a_small_cache_keeps_outputs_right(tiny_llama: Path) -> None:
    """A cache of 12 blocks: each 52-token request needs 4, so cached prefixes are evicted and reused."""
    prompts = [tuple(range(s, s + 40)) for s in (100, 200, 300, 100, 400, 200)]
    reqs = [EngineRequest(f"e{i}", p, GREEDY) for i, p in enumerate(prompts)]
    want = {r.request_id: _tokens(_engine(tiny_llama, False), [r])[r.request_id] for r in reqs}
    eng = _engine(tiny_llama, True, tokens=12 * 16)
    got = {}
    for r in reqs:
        got.update(_tokens(eng, [r]))
    assert got == want
    assert eng.stats().prefix_cached_tokens_total > 0 and eng.stats().kv_blocks_used == 0


def test_on_by_default_and_n_above_one_shares_the_cached_prompt(tiny_llama: Path) -> None:
    eng = _engine(tiny_llama, True)
    two = SamplingParams(max_tokens=6, temperature=0.9, seed=5, ignore_eos=True, n=2)
    _tokens(eng, [EngineRequest("a", PREFIX, GREEDY)])
    res = eng.generate([EngineRequest("b", (*PREFIX, 5), two)])["b"]
    assert len(res) == 2 and eng.stats().prefix_cached_tokens_total == 32  # two blocks, shared by both
    alone = _engine(tiny_llama, False).generate([EngineRequest("b", (*PREFIX, 5), two)])["b"]
    assert [[t for o in s for t in o.new_token_ids] for s in res] == [
        [t for o in s for t in o.new_token_ids] for s in alone
    ]
    assert eng.stats().kv_blocks_used == 0
    default = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096))
    _tokens(default, [EngineRequest("a", PREFIX, GREEDY)])
    _tokens(default, [EngineRequest("c", (*PREFIX, 5), GREEDY)])
    assert default.stats().prefix_cached_tokens_total > 0
    off = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=4096, enable_prefix_caching=False))
    _tokens(off, [EngineRequest("a", PREFIX, GREEDY)])
    _tokens(off, [EngineRequest("c", (*PREFIX, 5), GREEDY)])
    assert off.stats().prefix_cached_tokens_total == 0


@pytest.mark.parametrize("caching", [False, True])
def test_blocks_all_return(tiny_llama: Path, caching: bool) -> None:
    eng = _engine(tiny_llama, caching)
    _tokens(eng, [EngineRequest(f"x{i}", (*PREFIX, i), GREEDY) for i in range(4)])
    assert eng.stats().kv_blocks_used == 0


def test_salted_keys_differ_from_unsalted_and_from_other_salts() -> None:
    plain = prompt_block_keys(PREFIX)
    a, a2, b = (prompt_block_keys(PREFIX, salt=s) for s in ("tenant-a", "tenant-a", "tenant-b"))
    assert a == a2 and len(a) == len(plain) == 2
    assert not set(a) & set(plain) and not set(a) & set(b)
    with pytest.raises(ValueError, match="cache_salt"):
        EngineRequest("r", PREFIX, GREEDY, cache_salt="")


def test_cache_salt_shares_blocks_only_within_one_salt(tiny_llama: Path) -> None:
    """A salted request reuses a prefix sent with its own salt, not one sent unsalted or with another salt;
    its tokens are those of the uncached engine either way."""
    eng, plain = _engine(tiny_llama, True), _engine(tiny_llama, False)
    want = _tokens(plain, [EngineRequest("w", (*PREFIX, 7), GREEDY)])["w"]
    _tokens(eng, [EngineRequest("a", (*PREFIX, 5), GREEDY)])  # unsalted
    cached = eng.stats().prefix_cached_tokens_total
    got = _tokens(eng, [EngineRequest("s1", (*PREFIX, 7), GREEDY, cache_salt="tenant-a")])["s1"]
    assert got == want and eng.stats().prefix_cached_tokens_total == cached  # no hit across salts
    _tokens(eng, [EngineRequest("s2", (*PREFIX, 6), GREEDY, cache_salt="tenant-b")])
    assert eng.stats().prefix_cached_tokens_total == cached
    got = _tokens(eng, [EngineRequest("s3", (*PREFIX, 7), GREEDY, cache_salt="tenant-a")])["s3"]
    assert got == want and eng.stats().prefix_cached_tokens_total == cached + 32  # two blocks of its own salt


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("salt", [None, "tenant-a"])
def test_next_turn_reads_the_answer_s_blocks(tiny_llama: Path, overlap: bool, salt: str | None) -> None:
    """A chat's next prompt repeats the last answer: the blocks the answer filled were registered in the same
    chain as prompt blocks, so the next turn reads them, and its tokens are those of an engine without the
    cache. The key of a generated block is the key a prompt of the same tokens gets."""
    cfg = EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, overlap_decode=overlap)
    eng = LLMEngine(tiny_llama, cfg)
    first = EngineRequest("t1", PREFIX[:20], replace(GREEDY, max_tokens=30), cache_salt=salt)
    answer = _tokens(eng, [first])["t1"]
    # 20 + 30 tokens, the last never fed back: 49 computed, so three full blocks (48 tokens) are registered
    turn2 = (*PREFIX[:20], *answer, 7, 8, 9)
    before = eng.stats().prefix_cached_tokens_total
    second = EngineRequest("t2", turn2, GREEDY, cache_salt=salt)
    got = _tokens(eng, [second])["t2"]
    assert eng.stats().prefix_cached_tokens_total - before == 48
    assert got == _tokens(_engine(tiny_llama, False), [second])["t2"]
    other_salt = EngineRequest("t3", turn2, GREEDY, cache_salt="someone-else")
    before = eng.stats().prefix_cached_tokens_total
    _tokens(eng, [other_salt])
    assert eng.stats().prefix_cached_tokens_total == before  # another tenant's chain: nothing shared
    assert eng.stats().kv_blocks_used == 0


@pytest.mark.parametrize("overlap", [True, False])
def test_next_turn_reads_the_blocks_of_any_of_n_answers(tiny_llama: Path, overlap: bool) -> None:
    """With n = 2 each answer continues the prompt's chain of keys in its own, so a next turn that repeats
    either answer reads the blocks that answer filled (not only the prompt's), and its tokens are those of an
    engine without the cache."""
    cfg = EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, overlap_decode=overlap)
    eng = LLMEngine(tiny_llama, cfg)
    two = SamplingParams(max_tokens=30, temperature=0.9, seed=3, ignore_eos=True, n=2)
    res = eng.generate([EngineRequest("t1", PREFIX[:20], two)])["t1"]
    answers = [[t for o in s for t in o.new_token_ids] for s in res]
    assert len(answers) == 2 and answers[0] != answers[1]
    for i, answer in enumerate(answers):
        # 20 + 30 tokens, the last never fed back: 49 computed, three full blocks (the first the prompt's)
        turn2 = EngineRequest(f"t2-{i}", (*PREFIX[:20], *answer, 7, 8, 9), GREEDY)
        before = eng.stats().prefix_cached_tokens_total
        got = _tokens(eng, [turn2])[turn2.request_id]
        assert eng.stats().prefix_cached_tokens_total - before == 48
        assert got == _tokens(_engine(tiny_llama, False), [turn2])[turn2.request_id]
    assert eng.stats().kv_blocks_used == 0
