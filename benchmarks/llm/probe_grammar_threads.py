"""Host cost of 64 rows' grammar masks a step: deep copies of one matcher against separately compiled ones,
at 1-16 of llguidance's threads. No GPU needed; run on the GPU machine for its 16 cores.

    python benchmarks/llm/probe_grammar_threads.py

The bench_structured.py schema and tokenizer (the standard library's source, ~39k tokens, masks over the
1.2B shape's 128,256 ids). 64 token sequences are drawn first (uniformly among the allowed tokens), then
replayed through each kind of matcher: ms a step for the 64 masks. Also the time to compile one matcher and
to check the grammar text alone.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from llguidance import LLExecutor, LLMatcher, LLTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from bench_structured import SCHEMA, retrain_tokenizer

from inferforge.llm.structured import JSON_OPTIONS

VOCAB = 128256
WORDS = (VOCAB + 31) // 32


def draw(tok: LLTokenizer, grammar: str, real: int, rows: int = 64, seed: int = 0) -> list[list[int]]:
    """Token sequences the grammar accepts, each token drawn uniformly among the allowed real tokens."""
    rng, template, out = np.random.default_rng(seed), LLMatcher(tok, grammar, log_level=0), []
    mask = np.full(WORDS, -1, np.int32)
    for _ in range(rows):
        m, toks = template.deep_copy(), []
        while not m.is_stopped() and len(toks) < 120:
            m.unsafe_compute_mask_ptr(mask.ctypes.data, WORDS * 4)
            ids = np.nonzero(((mask[:, None] >> np.arange(32)) & 1).reshape(-1))[0]
            pick = ids[ids < real] if (ids < real).any() else ids
            toks.append(int(rng.choice(pick)))
            m.consume_token(toks[-1])
        out.append(toks)
    return out


def replay(tok: LLTokenizer, grammar: str, outs: list[list[int]], copies: bool, threads: int) -> float:
    """ms a step for all rows' masks."""
    template = LLMatcher(tok, grammar, log_level=0)
    rows = [template.deep_copy() if copies else LLMatcher(tok, grammar, log_level=0) for _ in outs]
    mask, ex = np.full((len(rows), WORDS), -1, np.int32), LLExecutor(num_threads=threads)
    steps, total = min(map(len, outs)), 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        live = [(m, i) for i, m in enumerate(rows)]
        ex.unsafe_compute_mask_ptr(live, mask.ctypes.data, WORDS * 4, len(rows))
        total += time.perf_counter() - t0
        for m, toks in zip(rows, outs, strict=True):
            m.consume_token(toks[step])
    return total / steps * 1e3


def main() -> None:
    folder = Path(tempfile.mkdtemp())
    real = retrain_tokenizer(folder)
    tok = LLTokenizer((folder / "tokenizer.json").read_text(), n_vocab=VOCAB, eos_token=0)
    grammar = LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_OPTIONS)
    t0 = time.perf_counter()
    for _ in range(10):
        LLMatcher(tok, grammar, log_level=0)
    print(f"compile a matcher: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms")
    t0 = time.perf_counter()
    for _ in range(10):
        LLMatcher.validate_grammar(grammar)
    print(f"check the grammar text: {(time.perf_counter() - t0) / 10 * 1e3:.2f} ms")
    outs = draw(tok, grammar, real)
    for threads in (1, 4, 8, 12, 16):
        deep, fresh = replay(tok, grammar, outs, True, threads), replay(tok, grammar, outs, False, threads)
        print(f"{threads:2d} threads: deep copies {deep:.3f} ms a step, separate {fresh:.3f}", flush=True)


if __name__ == "__main__":
    main()
