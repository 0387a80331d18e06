"""Speculative decoding by prompt lookup on the GPU: batch-1 greedy tokens/s with it (4 drafts) and without,
with its draft and acceptance counts, on two models in one call. Each setting its own engine, in turn,
`--rounds` times; writes `speculative.json` under $OUT.

    python benchmarks/llm/bench_speculative.py [--seconds 60] [--rounds 2]

1. The project's own small Llama (`train_small_llama.py`'s recipe, trained here for `--seconds` on the
   standard library's source) on a copying task from held-out source: 200 tokens, then their first 24
   again; 128 tokens generated. A trained model continues by copying where it learned to, which is what
   prompt lookup drafts.
2. The 1.2B Llama shape with random weights (it copies nothing, so its outputs break every n-gram of 2+
   tokens: nothing is drafted, and the figure is what speculation costs where it finds nothing): 256 random
   tokens twice and their first 16, and 512 random tokens. `--forced`: only this model, with a lookup that
   always drafts (nearly all rejected): what a verification pass costs against a decode step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free, make_random_1b, write_json
from train_small_llama import SAVE, corpus, encode, tokenizer, train

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.speculative import SpecConfig

RESULTS: dict = {}


def decode(eng: LLMEngine, prompt: tuple[int, ...], n: int = 128) -> tuple[float, list[int]]:
    """Tokens/s after the first token (prefill excluded), and the tokens."""
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
    eng.add_request(EngineRequest("x", prompt, params))
    toks: list[int] = []
    first = None
    while eng.has_unfinished():
        for out in eng.step():
            toks.extend(out.new_token_ids)
            first = first or time.perf_counter()
    assert first is not None
    return (len(toks) - 1) / (time.perf_counter() - first), toks


def measure(
    folder: Path, label: str, prompts: dict[str, list[tuple[int, ...]]], rounds: int, ngram_min: int = 0
) -> None:
    """`ngram_min` (1): look up single tokens too (Q6: a random model's outputs still found none)."""
    tokens: dict[tuple[str, int], list[list[int]]] = {}
    for r in range(rounds):
        for spec in (0, 4):
            cfg = EngineConfig(device="cuda", max_num_seqs=4, max_model_len=2048, kv_cache_tokens=16384,
                               speculative_tokens=spec)  # fmt: skip
            eng = LLMEngine(folder, cfg)
            if spec and ngram_min:
                eng._spec = SpecConfig(spec, ngram_min=ngram_min)
            decode(eng, prompts[next(iter(prompts))][0], 16)  # warm-up
            for task, plist in prompts.items():
                d0, a0 = eng.stats().spec_draft_tokens_total, eng.stats().spec_accepted_tokens_total
                rates, outs = [], []
                for p in plist:
                    rate, toks = decode(eng, p)
                    rates.append(rate)
                    outs.append(toks)
                tokens[(task, spec)] = outs
                st = eng.stats()
                res = {
                    "tok_s_median": statistics.median(rates),
                    "drafted": st.spec_draft_tokens_total - d0,
                    "accepted": st.spec_accepted_tokens_total - a0,
                    "generated": 128 * len(plist),
                }
                RESULTS[f"{label} {task} spec={spec} round {r}"] = res
                print(f"{label:10s} {task:12s} spec {spec}  round {r}: {res['tok_s_median']:8.1f} tok/s, "
                      f"drafted {res['drafted']}, accepted {res['accepted']} of {res['generated']} tokens",
                      flush=True)  # fmt: skip
            del eng
            free()
            write_json("speculative.json", RESULTS)
    for task in prompts:
        same = [a == b for a, b in zip(tokens[(task, 0)], tokens[(task, 4)], strict=True)]
        RESULTS[f"{label} {task} identical outputs"] = f"{sum(same)} of {len(same)}"
        print(f"{label} {task}: outputs identical with and without speculation: {sum(same)} of {len(same)}")
    write_json("speculative.json", RESULTS)


def forced(rounds: int) -> None:
    """Every decode step a verification pass: the lookup is replaced by one that always drafts k copies of
    the last token (a model with random weights rejects nearly all), so tokens/s is about one over the time
    of a verification step; against the plain engine's it gives the acceptance speculation needs to pay."""
    from inferforge.llm import engine as engine_mod

    real = engine_mod.propose
    engine_mod.propose = lambda tokens, k, lo, hi: [int(tokens[-1])] * k
    try:
        folder = make_random_1b(Path("/tmp/llama1b_random"))
        g = torch.Generator().manual_seed(1)
        fresh = [tuple(torch.randint(100, 500, (512,), generator=g).tolist()) for _ in range(4)]
        measure(folder, "1.2B forced", {"no-repeat": fresh}, rounds)
    finally:
        engine_mod.propose = real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--forced", action="store_true", help="only the 1.2B model with forced drafts")
    a = ap.parse_args()
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    if a.forced:
        forced(a.rounds)
        return
    train_txt, held_txt = corpus()
    tok = tokenizer(train_txt, SAVE)
    data, held = encode(tok, train_txt), encode(tok, held_txt)
    model, info = train(data, a.seconds, tok.get_vocab_size(), 8.0)
    model.to(torch.bfloat16).save_pretrained(SAVE, safe_serialization=True)
    RESULTS["small model"] = info
    del model
    free()
    g = torch.Generator().manual_seed(0)
    starts = torch.randint(0, held.numel() - 256, (8,), generator=g).tolist()
    spans = [tuple(held[s : s + 200].tolist()) for s in starts]
    measure(SAVE, "small", {"copy": [s + s[:24] for s in spans]}, a.rounds)
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    rand = [tuple(torch.randint(100, 500, (256,), generator=g).tolist()) for _ in range(4)]
    fresh = [tuple(torch.randint(100, 500, (512,), generator=g).tolist()) for _ in range(4)]
    measure(folder, "1.2B", {"repeated": [r + r + r[:16] for r in rand], "no-repeat": fresh}, a.rounds)


if __name__ == "__main__":
    main()
