"""Diagnosis (2026-11-23): does test_int8_split_k_at_64_rows_matches_gemlite_s_own_choice fail with and
without prompt-step graphs? Prints the largest second-token logprob gap and first-token agreement."""

from __future__ import annotations

import sys
from pathlib import Path

from inferforge.llm import quant
from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams
from inferforge.llm.tiny import make_tiny_llama

folder = make_tiny_llama(Path("/tmp/tiny_diag"), family="llama")
params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True, logprobs=0)
for graphs in ((), (128, 256)):
    res = {}
    for split_k in (False, True):
        quant.SPLITK_NARROW["on"] = split_k
        config = EngineConfig(device="cuda", quant="int8", kv_cache_tokens=64 * 64, max_num_seqs=64,
                              decode_buckets=(64,), overlap_decode=False, prefill_graph_tokens=graphs)
        eng = LLMEngine(folder, config)
        reqs = [EngineRequest(f"r{i}", (5 + i, 17, 99, 3 + i), params) for i in range(64)]
        out = eng.generate(reqs)
        res[split_k] = [[lp for o in out[f"r{i}"][0] for lp in o.logprobs] for i in range(64)]
    a, b = res[False], res[True]
    first = sum(x[0].token_id == y[0].token_id for x, y in zip(a, b)) / 64
    firstgap = max(abs(x[0].logprob - y[0].logprob) for x, y in zip(a, b))
    second = max(abs(x[1].logprob - y[1].logprob) for x, y in zip(a, b) if x[0].token_id == y[0].token_id)
    print(f"prefill graphs {graphs}: first-token agreement {first:.3f}, first gap {firstgap:.4f}, "
          f"second gap (same first) {second:.4f}", file=sys.stderr, flush=True)
