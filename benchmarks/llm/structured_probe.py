"""Where a batch-64 structured step's host time goes: cProfile of the engine loop with 64 JSON-schema requests
(the random 1.2B folder bench_structured.py leaves behind), and the mask and consume costs alone.

    python benchmarks/llm/structured_probe.py
"""

from __future__ import annotations

import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_structured import params, retrain_tokenizer
from common import make_random_1b

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest


def main() -> None:
    folder = Path(tempfile.gettempdir()) / "if_llama1b_structured"
    if not (folder / "config.json").exists():
        make_random_1b(folder)
        retrain_tokenizer(folder)
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64))

    def batch(tag: str) -> list[EngineRequest]:
        p = params("schema", 128)
        enc = eng.tokenizer.encode
        return [EngineRequest(f"{tag}{i}", tuple(enc(f"Record number {i}:")), p) for i in range(64)]

    eng.generate(batch("w"))
    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.enable()
    res = eng.generate(batch("p"))
    prof.disable()
    wall = time.perf_counter() - t0
    steps = max(outs[0][-1].completion_tokens for outs in res.values())
    print(f"wall {wall * 1e3:.1f} ms for ~{steps} steps: {wall / steps * 1e3:.2f} ms a step")
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
