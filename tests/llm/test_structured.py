"""Structured outputs on the tiny random Llama: whatever the weights, the output must satisfy the constraint,
greedy constrained decoding must equal the masked argmax of transformers' logits, and free-text requests in
the same batch must not notice."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from inferforge.errors import InferforgeError
from inferforge.llm.protocol import EngineRequest, SamplingParams, StructuredOutput
from inferforge.llm.speculative import eligible
from inferforge.llm.structured import GrammarCompiler, StructuredOutputError, allowed, check, resolve

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


def _schema(schema: dict) -> StructuredOutput:
    return StructuredOutput("json_schema", json.dumps(schema))


def _run(engine, requests: list[EngineRequest]) -> dict[str, list[tuple[str, list[int], str | None]]]:
    """Per request id, per sequence: (text, token ids, finish reason)."""
    out = {}
    for rid, seqs in engine.generate(requests).items():
        out[rid] = [
            ("".join(o.new_text for o in s), [t for o in s for t in o.new_token_ids], s[-1].finish_reason)
            for s in seqs
        ]
    return out


def _prompt(engine) -> tuple[int, ...]:
    return tuple(engine.tokenizer.encode("Describe a person as JSON:"))


def _req(engine, rid: str, structured: StructuredOutput | None = None, **params) -> EngineRequest:
    return EngineRequest(rid, _prompt(engine), SamplingParams(structured=structured, **params))


def test_json_schema_output_parses_and_conforms_whatever_the_weights(engine) -> None:
    seeds = range(4)
    reqs = [_req(engine, f"s{i}", _schema(PERSON), max_tokens=120, seed=i) for i in seeds]
    free = [_req(engine, f"f{i}", max_tokens=40, seed=i) for i in seeds]
    res = _run(engine, reqs + free)
    for i in seeds:
        text, _, reason = res[f"s{i}"][0]
        obj = json.loads(text)
        assert reason == "stop"  # the grammar closed the object; no end-of-sequence token was needed
        assert set(obj) == {"name", "age", "tags"}
        assert isinstance(obj["name"], str) and len(obj["name"]) <= 8
        assert isinstance(obj["age"], int) and 0 <= obj["age"] <= 150
        assert isinstance(obj["tags"], list) and len(obj["tags"]) <= 3 and set(obj["tags"]) <= {"a", "b"}
    # the same weights and seeds without the constraint do not write JSON: the mask is what made it
    for i in seeds:
        with pytest.raises(ValueError):
            json.loads(res[f"f{i}"][0][0])


def test_json_object_regex_choice_and_lark_grammar(engine) -> None:
    grammar = 'start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'
    choices = StructuredOutput("choice", json.dumps(["yes", "no", "maybe so"]))
    reqs = [
        _req(engine, "obj", StructuredOutput("json_object"), max_tokens=200, seed=0),
        _req(engine, "re", StructuredOutput("regex", r"[0-9]{3}-[0-9]{4}"), max_tokens=40, temperature=0.0),
        _req(engine, "ch", choices, max_tokens=40, seed=5, n=4),
        _req(engine, "lark", StructuredOutput("grammar", grammar), max_tokens=60, seed=2),
    ]
    res = _run(engine, reqs)
    obj_text, _, reason = res["obj"][0]
    if reason == "stop":
        assert isinstance(json.loads(obj_text), dict)
    else:  # out of tokens inside the object: still a prefix of one
        assert reason == "length" and obj_text.startswith("{")
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", res["re"][0][0]) and res["re"][0][2] == "stop"
    assert len(res["ch"]) == 4
    for text, _, reason in res["ch"]:
        assert text in {"yes", "no", "maybe so"} and reason == "stop"
    text, _, reason = res["lark"][0]
    assert reason in ("stop", "length")
    if reason == "stop":
        assert re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text)
    else:
        assert re.fullmatch(r"\(([1-9][0-9]?\+)*[1-9]?[0-9]?", text)


def test_greedy_constrained_tokens_equal_masked_argmax_of_transformers(tiny_llama: Path) -> None:
    """The engine's greedy tokens under a schema equal a reference loop: transformers' fp32 logits, the
    same grammar's mask from a fresh matcher, argmax, consume."""
    import transformers

    from inferforge.llm.engine import EngineConfig, LLMEngine

    eng = LLMEngine(tiny_llama, EngineConfig(dtype="float32", kv_cache_tokens=1024, device="cpu"))
    spec = _schema(PERSON)
    prompt = _prompt(eng)
    got = _run(eng, [_req(eng, "g", spec, max_tokens=60, temperature=0.0)])
    got_ids = got["g"][0][1]

    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama, torch_dtype=torch.float32).eval()
    compiler = GrammarCompiler(eng.tokenizer.hf, eng.model.cfg.vocab_size, eng.eos_ids)
    matcher = resolve(compiler.matchers(spec, 1)[0])
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(60):
            logits = hf(torch.tensor([ids])).logits[0, -1].float()
            ok = allowed(compiler.bitmask([matcher]), logits.shape[0])[0]
            tok = int(logits.masked_fill(~ok, float("-inf")).argmax())
            want.append(tok)
            ids.append(tok)
            assert matcher.consume_token(tok)
            if matcher.is_stopped():
                break
    assert got_ids == want
    assert got["g"][0][2] == "stop"


def test_free_text_rows_are_untouched_by_constrained_neighbours(engine) -> None:
    free = _req(engine, "free", max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = _run(engine, [free])["free"][0][1]
    constrained = [_req(engine, f"c{i}", _schema(PERSON), max_tokens=60, seed=i) for i in range(3)]
    together = _run(engine, [*constrained, free])["free"][0][1]
    assert together == alone


def test_overlapped_steps_give_the_synchronous_engine_s_outputs(tiny_llama: Path) -> None:
    """With overlap on, a structured row's forward pass is queued before the step in flight is read back,
    and its mask comes after: the tokens must equal those of an engine that waits every step."""
    from inferforge.llm.engine import EngineConfig, LLMEngine

    outs = {}
    for overlap in (True, False):
        eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=2048, overlap_decode=overlap, device="cpu"))
        reqs = [_req(eng, f"s{i}", _schema(PERSON), max_tokens=80, seed=i, n=2) for i in range(3)]
        reqs += [_req(eng, "free", max_tokens=30, temperature=0.0, ignore_eos=True)]
        got: dict[str, dict[int, list[int]]] = {}

        def collect(outputs, got=got) -> None:
            for o in outputs:
                got.setdefault(o.request_id, {}).setdefault(o.index, []).extend(o.new_token_ids)

        eng.add_request(reqs[0])
        collect(eng.step())  # the first prompt is computed (overlapped: its first tokens are in flight)
        assert eng._may_overlap() is overlap
        for r in reqs[1:]:
            eng.add_request(r)
        while eng.has_unfinished():
            collect(eng.step())
        outs[overlap] = got
    assert outs[True] == outs[False]
    for i in range(3):
        for ids in outs[True][f"s{i}"].values():
            assert set(json.loads(eng.tokenizer.decode(ids))) == set(PERSON["required"])


def test_max_tokens_cuts_the_output_with_length(engine) -> None:
    req = _req(engine, "short", _schema(PERSON), max_tokens=3, seed=0)
    text, ids, reason = _run(engine, [req])["short"][0]
    assert reason == "length" and len(ids) == 3 and text.startswith("{")


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        (StructuredOutput("regex", "(ab"), "regex"),
        (StructuredOutput("json_schema", "{not json"), "not valid JSON"),
        (StructuredOutput("json_schema", '{"type": "frob"}'), "frob"),
        (StructuredOutput("json_schema", "[1, 2]"), "must be a JSON object"),
        (StructuredOutput("choice", "[]"), "non-empty list"),
        (StructuredOutput("choice", '["a", 3]'), "non-empty list"),
        (StructuredOutput("grammar", "start: undefined_rule"), "grammar"),
    ],
)
def test_bad_constraints_are_refused_at_add_request_and_by_check(engine, spec, words) -> None:
    waiting = len(engine.scheduler.waiting)
    with pytest.raises(StructuredOutputError, match=re.escape(words) if words != "grammar" else None):
        engine.add_request(_req(engine, "bad", spec))
    assert len(engine.scheduler.waiting) == waiting  # nothing was queued
    with pytest.raises(StructuredOutputError):
        check(spec)
    assert issubclass(StructuredOutputError, InferforgeError)


def test_structured_output_fields_are_validated() -> None:
    with pytest.raises(ValueError, match="kind"):
        StructuredOutput("xml", "<a/>")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty spec"):
        StructuredOutput("regex", "")
    params = SamplingParams(temperature=0.0, structured=StructuredOutput("json_object"))
    assert not params.needs_history  # the engine stays overlapped (`test_overlapped_steps_...`)
    assert not eligible(params, 0)  # but never speculates: drafts are not checked against the grammar
    check(StructuredOutput("json_schema", json.dumps(PERSON)))  # a good one passes


def test_bitmask_unpacks_to_the_allowed_tokens() -> None:
    rng = np.random.default_rng(0)
    vocab = 70  # not a multiple of 32: the last word's high bits lie past the vocabulary
    want = rng.random((3, vocab)) < 0.3
    words = np.zeros((3, 3), dtype=np.int64)
    for r, t in zip(*np.nonzero(want), strict=True):
        words[r, t // 32] |= 1 << (t % 32)
    words[:, 2] |= ~((1 << (vocab - 64)) - 1) & 0xFFFFFFFF  # junk bits past the vocabulary
    bits = torch.from_numpy(words.astype(np.uint32).view(np.int32))
    assert torch.equal(allowed(bits, vocab), torch.from_numpy(want))
