"""The engine on a tiny Llama (CPU, fp32): batching, chunking, aborts, sampling, stops, logprobs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from inferforge.errors import InferforgeError
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.scheduler import QueueFullError, RequestTooLargeError

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)


def _ids(engine: LLMEngine, text: str) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode(text))


def _run(engine: LLMEngine, reqs: list[EngineRequest]) -> dict[str, list[list[int]]]:
    res = engine.generate(reqs)
    return {rid: [[t for o in outs for t in o.new_token_ids] for outs in seqs] for rid, seqs in res.items()}


def _text(engine: LLMEngine, req: EngineRequest) -> tuple[str, str | None]:
    outs = engine.generate([req])[req.request_id][0]
    return "".join(o.new_text for o in outs), outs[-1].finish_reason


def test_batched_equals_alone_with_staggered_arrivals(engine: LLMEngine) -> None:
    prompts = ["Return a new list", "The object", "If the argument is a string, parse it as a number"]
    reqs = [EngineRequest(f"b{i}", _ids(engine, p), GREEDY) for i, p in enumerate(prompts)]
    alone = {r.request_id: _run(engine, [r])[r.request_id] for r in reqs}
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    engine.add_request(reqs[0])
    for step in range(200):
        if step in (2, 5):
            engine.add_request(reqs[1 if step == 2 else 2])
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
        if step > 5 and not engine.has_unfinished():
            break
    assert got == {rid: seqs[0] for rid, seqs in alone.items()}
    assert engine.stats().kv_blocks_used == 0


def test_chunked_prefill_equals_whole_prefill(tiny_llama: Path, engine: LLMEngine) -> None:
    chunky = LLMEngine(
        tiny_llama, EngineConfig(kv_cache_tokens=1024, max_num_batched_tokens=5, max_num_seqs=2)
    )
    long_prompt = _ids(
        engine, "Return a new list of the lines in the string, breaking at line boundaries. " * 2
    )
    assert len(long_prompt) > 20
    req = EngineRequest("long", long_prompt, GREEDY)
    assert _run(chunky, [req]) == _run(engine, [req])


def test_abort_frees_blocks_while_running_and_while_queued(tiny_llama: Path) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=1024, max_num_seqs=1, max_num_batched_tokens=8))
    long = SamplingParams(max_tokens=100, ignore_eos=True)
    eng.add_request(EngineRequest("a", _ids(eng, "The object"), long))
    eng.add_request(EngineRequest("b", _ids(eng, "class"), long))
    for _ in range(3):
        eng.step()
    assert eng.stats().running == 1 and eng.stats().waiting == 1 and eng.stats().kv_blocks_used > 0
    (queued,) = eng.abort("b")
    assert queued.finished and queued.finish_reason == "abort" and eng.stats().waiting == 0
    (running,) = eng.abort("a")
    assert running.finish_reason == "abort" and running.completion_tokens > 0
    assert eng.stats().kv_blocks_used == 0 and not eng.has_unfinished()
    assert eng.abort("a") == []


def test_bounded_queue_and_oversized_requests(engine: LLMEngine) -> None:
    for i in range(engine.scheduler.config.max_waiting):
        engine.add_request(EngineRequest(f"q{i}", (5, 6), GREEDY))
    with pytest.raises(QueueFullError, match="max_waiting"):
        engine.add_request(EngineRequest("one-too-many", (5, 6), GREEDY))
    for i in range(engine.scheduler.config.max_waiting):
        engine.abort(f"q{i}")
    with pytest.raises(RequestTooLargeError, match="max_model_len"):
        engine.add_request(EngineRequest("huge", (5,) * engine.max_model_len, GREEDY))
    assert not engine.has_unfinished()


def test_seeded_sampling_is_reproducible_and_independent_of_batch(engine: LLMEngine) -> None:
    prompt = _ids(engine, "The object")

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, top_k=50, seed=seed, ignore_eos=True)

    alone = _run(engine, [EngineRequest("s1", prompt, params(1))])["s1"][0]
    together = _run(engine, [EngineRequest("s1", prompt, params(1)), EngineRequest("s2", prompt, params(2))])
    assert together["s1"][0] == alone
    assert together["s2"][0] != alone


def test_top_k_one_tiny_top_p_and_min_p_one_equal_greedy(engine: LLMEngine) -> None:
    prompt = _ids(engine, "Return a new list")
    greedy = _run(engine, [EngineRequest("g", prompt, GREEDY)])["g"][0]
    k1 = SamplingParams(max_tokens=24, temperature=1.5, top_k=1, ignore_eos=True)
    p0 = SamplingParams(max_tokens=24, temperature=1.0, top_p=1e-6, ignore_eos=True)
    m1 = SamplingParams(max_tokens=24, temperature=1.5, min_p=1.0, ignore_eos=True)
    free = SamplingParams(max_tokens=24, temperature=1.5, seed=3, ignore_eos=True)
    reqs = [EngineRequest("k", prompt, k1), EngineRequest("p", prompt, p0), EngineRequest("m", prompt, m1)]
    res = _run(engine, [*reqs, EngineRequest("f", prompt, free)])
    assert res["k"][0] == greedy and res["p"][0] == greedy and res["m"][0] == greedy
    assert res["f"][0] != greedy  # at this temperature sampling without min_p leaves greedy


def test_n_sequences_share_the_prompt(engine: LLMEngine) -> None:
    prompt = _ids(engine, "The object")
    greedy = _run(engine, [EngineRequest("g", prompt, GREEDY)])["g"][0]
    n3 = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, n=3)
    assert _run(engine, [EngineRequest("n", prompt, n3)])["n"] == [greedy] * 3
    sampled = SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True, n=3)
    seqs = _run(engine, [EngineRequest("m", prompt, sampled)])["m"]
    assert len({tuple(s) for s in seqs}) == 3
    assert engine.stats().kv_blocks_used == 0


def test_stop_strings_cut_the_text_exactly(engine: LLMEngine) -> None:
    prompt = _ids(engine, "Return a new list")
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    full, _ = _text(engine, EngineRequest("full", prompt, params))
    clean = [
        i
        for i in range(6, len(full) - 3)
        if "\ufffd" not in full[i : i + 3] and full[:i].count(full[i : i + 3]) == 0
    ]
    assert clean, full
    stop = full[clean[0] : clean[0] + 3]
    cut = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=("never-appears", stop))
    text, reason = _text(engine, EngineRequest("cut", prompt, cut))
    assert reason == "stop"
    assert text == full[: full.index(stop)]


def test_stop_token_ids_and_max_tokens(engine: LLMEngine) -> None:
    prompt = _ids(engine, "The object")
    ids = _run(engine, [EngineRequest("g", prompt, GREEDY)])["g"][0]
    assert len(ids) == GREEDY.max_tokens
    stop_at = ids[5]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=(stop_at,))
    outs = engine.generate([EngineRequest("t", prompt, params)])["t"][0]
    got = [t for o in outs for t in o.new_token_ids]
    assert got == ids[: ids.index(stop_at) + 1] and outs[-1].finish_reason == "stop"


def test_logprobs_equal_log_softmax_of_transformers_logits(engine: LLMEngine, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = _ids(engine, "Return a new list")
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=3, logprobs=3, ignore_eos=True)
    outs = engine.generate([EngineRequest("lp", prompt, params)])["lp"][0]
    lps = [lp for o in outs for lp in (o.logprobs or ())]
    ids = [lp.token_id for lp in lps]
    with torch.no_grad():
        logits = hf(torch.tensor([list(prompt) + ids])).logits[0, len(prompt) - 1 : -1]
    ref = logits.log_softmax(-1)
    for i, lp in enumerate(lps):
        assert lp.logprob == pytest.approx(ref[i, lp.token_id].item(), abs=1e-4)
        top_vals, top_ids = ref[i].topk(3)
        assert [t for t, _ in lp.top] == top_ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(top_vals.tolist(), abs=1e-4)


def test_repetition_penalty_matches_transformers(engine: LLMEngine, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = _ids(engine, "The object")
    params = SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)
    ours = _run(engine, [EngineRequest("r", prompt, params)])["r"][0]
    ref = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=20,
        min_new_tokens=20,
        do_sample=False,
        repetition_penalty=1.5,
        pad_token_id=0,
    )[0, len(prompt) :].tolist()
    assert ours == ref


def _greedy_with_output_penalties(hf, prompt: tuple[int, ...], n: int, presence: float, frequency: float):
    """OpenAI's formula on transformers' fp32 logits, one token at a time: the reference."""
    ids, out = list(prompt), []
    for _ in range(n):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
        logits = logits - frequency * counts - presence * (counts > 0).double()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out


def test_presence_and_frequency_penalties_match_openais_formula(engine: LLMEngine, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = _ids(engine, "The object")
    plain = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    penalized = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, presence_penalty=0.6,
                               frequency_penalty=1.1)  # fmt: skip
    alone = _run(engine, [EngineRequest("p", prompt, penalized)])["p"][0]
    assert alone == _greedy_with_output_penalties(hf, prompt, 20, 0.6, 1.1)
    plain_alone = _run(engine, [EngineRequest("g", prompt, plain)])["g"][0]
    assert alone != plain_alone  # the penalties changed the output
    together = _run(engine, [EngineRequest("p", prompt, penalized), EngineRequest("g", prompt, plain)])
    assert together["p"][0] == alone and together["g"][0] == plain_alone
    with pytest.raises(ValueError, match="presence_penalty"):
        SamplingParams(presence_penalty=2.5)


def test_logit_bias_matches_a_reference(engine: LLMEngine, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = _ids(engine, "The object")
    plain = _run(engine, [EngineRequest("g", prompt, GREEDY)])["g"][0]
    bias = ((plain[0], -100.0), (plain[1], -3.5), (7, 2.0))
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logit_bias=bias)
    ours = _run(engine, [EngineRequest("b", prompt, params), EngineRequest("g", prompt, GREEDY)])
    ids, ref = list(prompt), []
    for _ in range(24):
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        for t, b in bias:
            logits[t] += b
        ref.append(int(logits.argmax()))
        ids.append(ref[-1])
    assert ours["b"][0] == ref and ref[0] != plain[0]
    assert ours["g"][0] == plain  # its neighbour's bias does not leak into it
    with pytest.raises(InferforgeError, match="logit_bias"):
        engine.add_request(EngineRequest("x", prompt, SamplingParams(logit_bias=((10**6, 1.0),))))


def test_min_tokens_holds_off_stop_tokens_and_stop_strings(engine: LLMEngine, tiny_llama: Path) -> None:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompt = _ids(engine, "The object")
    plain = _run(engine, [EngineRequest("g", prompt, GREEDY)])["g"][0]
    stop_id = plain[2]  # greedy would stop at its third token
    stopping = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_id,))
    held = SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=(stop_id,), min_tokens=10)
    res = _run(engine, [EngineRequest("s", prompt, stopping), EngineRequest("h", prompt, held)])
    assert res["s"][0] == plain[:3]
    ids, ref = list(prompt), []  # reference: the stop id and end-of-sequence banned for 10 tokens
    while len(ref) < 24:
        with torch.no_grad():
            logits = hf(torch.tensor([ids])).logits[0, -1].double()
        if len(ref) < 10:
            logits[[stop_id, *engine.eos_ids]] = float("-inf")
        ref.append(int(logits.argmax()))
        ids.append(ref[-1])
        if len(ref) > 10 and (ref[-1] == stop_id or ref[-1] in engine.eos_ids):
            break
    assert res["h"][0] == ref and len(ref) >= 10
    free = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    text, _ = _text(engine, EngineRequest("t", prompt, free))
    early = text[1:3]  # a stop string that appears at once
    cut, _ = _text(engine, EngineRequest("c", prompt, replace(free, stop=(early,))))
    kept, reason = _text(engine, EngineRequest("k", prompt, replace(free, stop=(early,), min_tokens=12)))
    assert len(cut) < len(text) and kept == text and reason == "length"


def test_detokenize_false_gives_the_same_tokens_without_text(engine: LLMEngine) -> None:
    prompt = _ids(engine, "The object")
    with_text = engine.generate([EngineRequest("t", prompt, GREEDY)])["t"][0]
    ids_only = engine.generate([EngineRequest("i", prompt, replace(GREEDY, detokenize=False))])["i"][0]
    assert [t for o in ids_only for t in o.new_token_ids] == [t for o in with_text for t in o.new_token_ids]
    assert all(o.new_text == "" for o in ids_only) and "".join(o.new_text for o in with_text)
    with pytest.raises(ValueError, match="stop strings need detokenize"):
        replace(GREEDY, detokenize=False, stop=("x",))


def test_reserved_budgets_wait_for_kv_blocks_and_then_complete(tiny_llama: Path, engine: LLMEngine) -> None:
    cfg = EngineConfig(
        kv_cache_tokens=64, max_num_seqs=8, max_num_batched_tokens=64, reserve_full_budget=True
    )
    small = LLMEngine(tiny_llama, cfg)
    reqs = [
        EngineRequest(f"w{i}", _ids(engine, p), GREEDY)
        for i, p in enumerate(["The object", "class", "Return"])
    ]
    for r in reqs:
        small.add_request(r)
    got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
    for out in small.step():
        got[out.request_id].extend(out.new_token_ids)
    # each request reserves blocks for prompt + 24 tokens (2 blocks); 4 usable blocks admit two at a time
    assert small.stats().running == 2 and small.stats().waiting == 1
    while small.has_unfinished():
        for out in small.step():
            got[out.request_id].extend(out.new_token_ids)
    alone = {r.request_id: _run(engine, [r])[r.request_id][0] for r in reqs}
    assert got == alone and small.stats().kv_blocks_used == 0


def test_out_of_vocabulary_prompt_ids_are_refused(engine: LLMEngine) -> None:
    from inferforge.errors import InferforgeError

    with pytest.raises(InferforgeError, match="vocabulary"):
        engine.add_request(EngineRequest("oov", (1, 10**6), GREEDY))
    assert not engine.has_unfinished()


def test_engine_config_names_a_bad_gemm_library() -> None:
    from inferforge.errors import InferforgeError

    with pytest.raises(InferforgeError, match="gemm_library must be cublas, cublaslt or None, got 'mkl'"):
        EngineConfig(gemm_library="mkl")  # type: ignore[arg-type]
    assert EngineConfig().gemm_library == "cublaslt"


def test_prompts_prefilled_together_equal_alone(engine: LLMEngine) -> None:
    """Fresh prompts in one step are attended in groups by length bucket: 3 and 4 padded, 12, 16 and 9
    padded (others between them in the batch); 7 and 7 back to back, a dense group (views, no gather); 2
    alone; 60 tokens, all in one step. Each must generate what it generates alone."""
    reqs = [EngineRequest(f"p{n}-{i}", tuple(range(20 + i, 20 + i + n)), GREEDY)
            for i, n in enumerate((3, 12, 4, 7, 7, 16, 9, 2))]  # fmt: skip
    alone = {r.request_id: _run(engine, [r])[r.request_id] for r in reqs}
    assert _run(engine, reqs) == alone


def test_chunk_slots_computed_together_equal_slot_by_slot() -> None:
    from types import SimpleNamespace

    from inferforge.llm.kv_cache import slot_of
    from inferforge.llm.runner import _chunk_positions_and_slots

    cases = [([7, 3, 9, 1, 12], 0, 1), ([7, 3, 9, 1, 12], 5, 35), ([4, 2], 15, 2),
             ([8, 6, 5, 11, 10], 16, 16), ([2, 13, 14, 15, 16, 17], 3, 77), ([1, 2, 3], 40, 1)]  # fmt: skip
    chunks = [(SimpleNamespace(blocks=b, num_computed=start), n) for b, start, n in cases]
    got = _chunk_positions_and_slots(chunks)  # type: ignore[arg-type]
    want_pos = [p for _, start, n in cases for p in range(start, start + n)]
    want_slots = [slot_of(seq.blocks, p) for seq, n in chunks
                  for p in range(seq.num_computed, seq.num_computed + n)]  # fmt: skip
    assert got[0].tolist() == want_pos
    assert got[1].tolist() == want_slots


def test_decode_inputs_rewrite_block_table_rows_only_where_they_change(engine: LLMEngine) -> None:
    """`ModelRunner._fill` keeps each staging buffer's block-table rows and rewrites a row only when its
    blocks change; whatever the sequence of batches, each buffer must hold exactly this batch's tables, and
    rows past the batch (padding up to the bucket) zero."""
    from types import SimpleNamespace

    runner = engine.runner
    n, width = runner.buckets[-1], runner.max_blocks

    def seq(blocks: list[int], length: int) -> SimpleNamespace:
        return SimpleNamespace(blocks=blocks, token_ids=list(range(length)))

    batches = [
        [seq([3, 4], 20), seq([7], 5)],
        [seq([3, 4], 21), seq([7], 6)],  # same blocks: rows kept
        [seq([9, 10, 11], 40)],  # fewer rows, different blocks; the old second row must be cleared
        [seq([7], 7), seq([3, 4, 12], 33), seq([5], 2)],
        [seq([5], 3)],
    ]
    for batch in batches:
        for bucket in (len(batch), min(n, len(batch) + 1)):
            runner._fill(batch, bucket, None)  # type: ignore[arg-type]
            h = runner._hosts[runner._turn].numpy()
            tables = h[4 * n :].reshape(n, width)[:bucket]
            for i in range(bucket):
                want = batch[i].blocks if i < len(batch) else []
                assert tables[i, : len(want)].tolist() == want and not tables[i, len(want) :].any()
            assert h[: len(batch)].tolist() == [s.token_ids[-1] for s in batch]
            assert h[n : n + len(batch)].tolist() == [len(s.token_ids) - 1 for s in batch]


def _admitted_after(engine: LLMEngine, late: EngineRequest, steps_before: int) -> tuple[int, list[int]]:
    """Steps after `late` joined until the scheduler took it in, and its greedy tokens."""
    for _ in range(steps_before):
        engine.step()
    engine.add_request(late)
    tokens: list[int] = []
    admitted = None
    for step in range(1, 200):
        for out in engine.step():
            if out.request_id == late.request_id:
                tokens.extend(out.new_token_ids)
        running = {r.request.request_id for r in engine.scheduler.running}
        if admitted is None and (late.request_id in running or tokens):
            admitted = step
        if not engine.has_unfinished():
            break
    assert admitted is not None
    return admitted, tokens


def test_admit_delay_holds_arrivals_while_others_decode(tiny_llama: Path) -> None:
    """`admit_delay_steps`: an arrival waits up to that many steps while another request decodes; at once
    when the engine is idle or when the arrivals fill every free slot; its tokens are unchanged."""
    first = EngineRequest("first", (5, 6, 7, 8), GREEDY)
    late = EngineRequest("late", (9, 10, 11), GREEDY)

    def engine_with(delay: int, seqs: int = 4) -> LLMEngine:
        cfg = EngineConfig(kv_cache_tokens=4096, max_num_batched_tokens=64, max_num_seqs=seqs,
                           admit_delay_steps=delay)  # fmt: skip
        return LLMEngine(tiny_llama, cfg)

    alone = _run(engine_with(3), [late])["late"][0]  # idle engine: admitted at its first step
    eng = engine_with(3)
    eng.add_request(first)
    held, tokens = _admitted_after(eng, late, steps_before=3)
    assert held == 4 and tokens == alone
    eng = engine_with(0)
    eng.add_request(first)
    assert _admitted_after(eng, late, steps_before=3) == (1, alone)
    eng = engine_with(3, seqs=2)  # one free slot, one arrival: it fills them all, no wait
    eng.add_request(first)
    assert _admitted_after(eng, late, steps_before=3) == (1, alone)
    with pytest.raises(Exception, match="admit_delay_steps"):
        engine_with(-1)


def test_stop_sequence_ends_one_sequence_and_the_others_go_on(engine: LLMEngine) -> None:
    """What a link that makes the text does on a stop string of an n > 1 request: that sequence emits
    nothing more, the others run to max_tokens, and the blocks come back when the last one ends."""
    prompt = _ids(engine, "Return a new list")
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=4, ignore_eos=True, n=3)
    engine.add_request(EngineRequest("s", prompt, params))
    counts = [0, 0, 0]
    while min(counts) < 2:
        for o in engine.step():
            counts[o.index] += len(o.new_token_ids)
    assert engine.stop_sequence("s", 1) and not engine.stop_sequence("s", 1)
    assert not engine.stop_sequence("nobody", 0) and not engine.stop_sequence("s", 7)
    stopped_at, finals = counts[1], {}
    while engine.has_unfinished():
        for o in engine.step():
            counts[o.index] += len(o.new_token_ids)
            if o.finished:
                finals[o.index] = o.finish_reason
    assert counts[1] == stopped_at  # the step in flight when it was stopped is dropped too
    assert counts[0] == counts[2] == 12 and finals == {0: "length", 2: "length"}
    assert engine.stats().kv_blocks_used == 0


def test_a_loaded_engine_freezes_the_heap_out_of_the_collector(tiny_llama: Path) -> None:
    """`freeze_gc_heap` (on by default): what is alive once the engine is loaded leaves the cyclic
    collector's scans; off, the engine leaves the collector as it found it."""
    import gc

    gc.unfreeze()
    try:
        LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=256, freeze_gc_heap=False))
        assert gc.get_freeze_count() == 0
        eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=256))
        assert gc.get_freeze_count() > 0
        out = eng.generate([EngineRequest("r", (5, 6, 7), SamplingParams(max_tokens=3, temperature=0.0))])
        assert sum(len(o.new_token_ids) for o in out["r"][0]) == 3  # and it runs as before
    finally:
        gc.unfreeze()
