"""Engine step-loop time per generated token with the engine detokenizing, and without (`detokenize=False`,
as the OpenAI server's process engine now asks: its HTTP workers make the text).

Why: the engine process is the part of `serve-llm` that does not scale out, and the engine loop on the H100
is bound by its host work (it waited on the device 12-21% of the time, llm-runs.md I9). Runs the tiny model
on the CPU (any machine), 64 requests decoding together, the two settings in turn.

    python benchmarks/llm/detok_cost.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.tiny import make_tiny_llama


def one_round(eng: LLMEngine, params: SamplingParams, tag: str) -> float:
    """Seconds of `step()` per generated token for 64 requests of 8 prompt tokens."""
    for k in range(64):
        eng.add_request(EngineRequest(f"{tag}-{k}", tuple(10 + (7 * k + j) % 200 for j in range(8)), params))
    tokens, t0 = 0, time.perf_counter()
    while eng.has_unfinished():
        tokens += sum(len(o.new_token_ids) for o in eng.step())
    return (time.perf_counter() - t0) / tokens


def detokenizer_alone(folder: Path, stop: tuple[str, ...], reps: int = 200) -> float:
    """Seconds per token of `IncrementalDetokenizer.add` + `pop`, as the engine calls them for a row."""
    from inferforge.llm.detok import IncrementalDetokenizer, Tokenizer

    tok = Tokenizer(folder)
    ids = [(37 * i) % 250 + 3 for i in range(128)]
    t0 = time.perf_counter()
    for _ in range(reps):
        d = IncrementalDetokenizer(tok, stop)
        for i in ids:
            d.add(i)
            d.pop(False)
    return (time.perf_counter() - t0) / (reps * len(ids))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=64)
    a = p.parse_args()
    folder = make_tiny_llama(Path(tempfile.mkdtemp()) / "tiny")
    for stop in ((), ("\n\n",)):
        detokenizer_alone(folder, stop, reps=20)  # warm-up
        per = detokenizer_alone(folder, stop) * 1e6
        print(f"detokenizer alone, stop strings {stop!r}: {per:.2f} us a token")
    eng = LLMEngine(folder, EngineConfig(device="cpu"))
    text = SamplingParams(max_tokens=a.tokens, temperature=0.0, ignore_eos=True)
    ids_only = replace(text, detokenize=False)
    one_round(eng, text, "warm")
    runs: dict[str, list[float]] = {"detokenize": [], "token ids only": []}
    for r in range(a.rounds):  # in turn
        runs["detokenize"].append(one_round(eng, text, f"t{r}"))
        runs["token ids only"].append(one_round(eng, ids_only, f"i{r}"))
    for label, per in runs.items():
        us = [x * 1e6 for x in per]
        rounds = ", ".join(f"{u:.2f}" for u in us)
        print(f"{label:15s}: median {statistics.median(us):.2f} us a token (rounds {rounds})")


if __name__ == "__main__":
    main()
