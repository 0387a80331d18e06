"""Structured outputs on the GPU: what a grammar costs a request's tokens, against free text in the same run.

    python benchmarks/llm/bench_structured.py [--reps 12] [--rounds 2]

Model: the Llama-3.2-1B shape with random bf16 weights (common.make_random_1b). Its tokenizer is retrained
here on the standard library's source (a byte-level BPE, ~44k tokens), so the grammar masks are computed over
a vocabulary of a real size; the model's 128,256 logits are masked (tokens the tokenizer lacks are never
allowed).

Settings, each in its own engine, in turn, `--rounds` times:
- batch 1, `--reps` requests one after another, greedy: free text (ignore_eos, 64 tokens); a JSON schema
  (strings and arrays bounded, so random weights still close the object); the JSON schema with
  `overlap_decode` off (every step waits for the one before: the engine before its
  masks were staged while the forward pass runs).
- batch 64: 64 requests added at once: free text (48 tokens) against the JSON schema.
Per setting: the median inter-token latency over requests ((finished - first token) / (tokens - 1)), tokens/s
over the setting's wall time, tokens a request. Then the host cost of the masks: each request's tokens
replayed through a fresh matcher, microseconds per mask (one row; 64 rows at once through llguidance's
threads). Prints a table; writes bench_structured.json under $OUT.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams, StructuredOutput
from inferforge.llm.structured import GrammarCompiler, resolve

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "email": {"type": "string", "pattern": "^[a-z]{1,8}@[a-z]{1,8}\\.com$"},
        "tags": {"type": "array", "items": {"enum": ["admin", "user", "guest"]}, "maxItems": 3},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "tags", "active"],
    "additionalProperties": False,
}
PROMPT = "Write one user record as JSON."


def retrain_tokenizer(folder: Path) -> int:
    """A byte-level BPE on the standard library's source in place of the tiny one (same special tokens
    first, so the end-of-text id stays)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from inferforge.llm.tiny import SPECIAL_TOKENS

    lib = sysconfig.get_paths()["stdlib"]
    texts = []
    for f in sorted(glob.glob(lib + "/**/*.py", recursive=True)):
        if "site-packages" not in f and "/test" not in f:
            try:
                texts.append(Path(f).read_text(encoding="utf-8"))
            except (UnicodeDecodeError, OSError):
                continue
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=128000, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=alphabet, show_progress=False)  # fmt: skip
    tok.train_from_iterator(texts, trainer=trainer)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size()


def params(kind: str, max_tokens: int) -> SamplingParams:
    structured = {
        "free": None,
        "schema": StructuredOutput("json_schema", json.dumps(SCHEMA)),
    }[kind]
    return SamplingParams(
        max_tokens=max_tokens, temperature=0.0, ignore_eos=kind == "free", structured=structured
    )


def itl_ms(outs: list) -> float | None:
    t, n = outs[-1].timing, outs[-1].completion_tokens
    if n < 2 or t.first_token is None or t.finished is None:
        return None
    return (t.finished - t.first_token) / (n - 1) * 1e3


def run(eng: LLMEngine, kind: str, batch: int, reps: int, max_tokens: int) -> tuple[dict, list[list[int]]]:
    def prompt(i: int) -> tuple[int, ...]:  # distinct prompts: distinct greedy outputs and grammar states
        return tuple(eng.tokenizer.encode(f"{PROMPT} Record number {i}:"))

    eng.generate([EngineRequest("warm", prompt(0), params(kind, max_tokens))])
    itls, tokens, texts = [], [], []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for r in range(reps if batch == 1 else 1):
        reqs = [
            EngineRequest(f"r{r}-{i}", prompt(r * batch + i), params(kind, max_tokens)) for i in range(batch)
        ]
        for outs in eng.generate(reqs).values():
            seq = outs[0]
            itl = itl_ms(seq)
            if itl is not None:
                itls.append(itl)
            tokens.append([t for o in seq for t in o.new_token_ids])
            texts.append("".join(o.new_text for o in seq))
    wall = time.perf_counter() - t0
    valid = None
    if kind != "free":
        valid = sum(1 for t in texts if _parses(t)) / len(texts)
    return {
        "itl_ms_median": statistics.median(itls),
        "tok_s": sum(map(len, tokens)) / wall,
        "tokens_per_request": statistics.median(map(len, tokens)),
        "valid_json_fraction": valid,
        "example": texts[0][:200],
    }, tokens


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def mask_cost(eng: LLMEngine, outputs: list[list[int]]) -> dict:
    """Host microseconds a mask: each output's tokens replayed through a fresh matcher of the schema."""
    comp = GrammarCompiler(eng.tokenizer.hf, eng.model.cfg.vocab_size, eng.eos_ids)
    spec = params("schema", 1).structured
    assert spec is not None
    one = []
    for toks in outputs[:8]:
        m = resolve(comp.matchers(spec, 1)[0])
        for t in toks:
            a = time.perf_counter()
            comp.bitmask([m])
            one.append((time.perf_counter() - a) * 1e6)
            m.consume_token(t)
    rows = [resolve(f) for f in comp.matchers(spec, 64)]
    many = []
    for step in range(min(len(t) for t in outputs[:64])):
        a = time.perf_counter()
        comp.bitmask(rows)
        many.append((time.perf_counter() - a) * 1e6)
        for m, toks in zip(rows, outputs[:64], strict=False):
            m.consume_token(toks[step])
    return {"one_row_us_p50": float(np.percentile(one, 50)), "one_row_us_p90": float(np.percentile(one, 90)),
            "rows64_us_p50": float(np.percentile(many, 50)) if many else None}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batches", default="1,64", help="which batch settings to run")
    a = ap.parse_args()
    folder = make_random_1b(Path(tempfile.gettempdir()) / "if_llama1b_structured")
    vocab = retrain_tokenizer(folder)
    b1 = [("free", 1, 64, True), ("schema", 1, 128, True), ("schema", 1, 128, False)]
    b64 = [("free", 64, 48, True), ("schema", 64, 128, True)]
    rows: list[dict] = []
    cost: dict = {}
    outputs: dict[str, list[list[int]]] = {}
    for rnd in range(a.rounds):
        chosen = [s for s in b1 + b64 if str(s[1]) in a.batches.split(",")]
        for kind, batch, max_tokens, overlap in chosen:
            eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64, overlap_decode=overlap))
            res, toks = run(eng, kind, batch, a.reps, max_tokens)
            if kind == "schema" and overlap:
                outputs[f"b{batch}"] = toks
            row = {"round": rnd, "kind": kind, "batch": batch, "overlap": overlap, **res}
            rows.append(row)
            print(f"round {rnd} {kind:6s} batch {batch:2d} overlap {overlap!s:5s}: "
                  f"ITL {res['itl_ms_median']:.3f} ms, "
                  f"{res['tok_s']:,.0f} tok/s, {res['tokens_per_request']} tokens/request, "
                  f"valid {res['valid_json_fraction']}", flush=True)  # fmt: skip
            if rnd == a.rounds - 1 and kind == "schema" and batch == 64:
                cost = mask_cost(eng, outputs["b64"])
                print(f"mask cost: {cost}", flush=True)
            del eng
            free()
    device = torch.cuda.get_device_name()
    write_json("bench_structured.json", {"tokenizer_vocab": vocab, "rows": rows, "mask_cost": cost,
                                         "device": device, "torch": torch.__version__})  # fmt: skip


if __name__ == "__main__":
    main()
