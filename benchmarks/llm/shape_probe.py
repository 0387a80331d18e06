"""Why do some prompt steps of the server take 55-90 ms where the same kind of step takes 12 (trace of
2026-11-23, I5)? Times the first and the second call of each new prompt count: SDPA alone (default backend
choice, flash only, cuDNN only), then the engine's whole prompt step; then chunked prompts (later chunks
attend through the masked path) of new lengths. Run on the GPU:
    python benchmarks/llm/shape_probe.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from common import make_random_1b

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def sdpa_calls(counts: list[int], backend: SDPBackend | None) -> None:
    for n in counts:
        q = torch.randn(n * 128, 32, 64, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(n * 128, 8, 64, device="cuda", dtype=torch.bfloat16)
        qs, ks, vs = (x.view(n, 128, *x.shape[1:]).transpose(1, 2) for x in (q, k, k))

        def run(qs: torch.Tensor = qs, ks: torch.Tensor = ks, vs: torch.Tensor = vs) -> None:
            if backend is None:
                F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)
            else:
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, enable_gqa=True)

        first, second = timed(run), timed(run)
        print(f"sdpa {backend or 'default'} n={n:3d}: first {first:7.2f} ms, second {second:6.3f} ms")


def engine_steps(folder: Path, counts: list[int]) -> None:
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64, max_num_batched_tokens=8192))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    for rep, n in enumerate(counts):
        for i in range(n):
            ids = tuple(torch.randint(100, 500, (128,), generator=g).tolist())
            eng.add_request(EngineRequest(f"p{rep}-{i}", ids, params))
        times = []
        while eng.has_unfinished():
            times.append(timed(eng.step))
        print(f"engine prompt step n={n:3d} ({n * 128} tokens): steps ms {[round(t, 1) for t in times]}")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name(0), flush=True)
    sdpa_calls([64, 13, 18, 21, 28, 42, 13, 18], None)
    sdpa_calls([5, 11, 19, 27, 5, 11], SDPBackend.FLASH_ATTENTION)
    sdpa_calls([6, 12, 20, 6], SDPBackend.CUDNN_ATTENTION)  # (memory-efficient attention takes no GQA)
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    engine_steps(folder, [64, 13, 18, 21, 28, 42, 13, 18, 21, 28, 42, 33, 33])
    chunked_steps(folder, [300, 700, 1100, 700, 1500])


def chunked_steps(folder: Path, lengths: list[int]) -> None:
    eng = LLMEngine(folder, EngineConfig(device="cuda", max_num_seqs=64, max_num_batched_tokens=256))
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    for k, n in enumerate(lengths):
        eng.add_request(EngineRequest(f"c{k}", tuple(range(100, 100 + n)), params))
        times = []
        while eng.has_unfinished():
            times.append(timed(eng.step))
        print(f"engine chunked prompt of {n} tokens, 256 a step: steps ms {[round(t, 1) for t in times]}")


if __name__ == "__main__":
    main()
