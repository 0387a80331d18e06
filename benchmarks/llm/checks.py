"""Correctness checks run on the GPU before any timing: the tiny models against transformers in fp32, the
fused kernels and the paged-decode kernel against their references, mixed steps against separate ones."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import free
from engine_bench import RESULTS, row

from inferforge.llm.engine import EngineConfig, LLMEngine
from inferforge.llm.protocol import EngineRequest, SamplingParams


def check_tiny() -> None:
    """Greedy on CUDA (fp32 and bf16) against transformers fp32 on the tiny models; the Triton kernel's
    error."""
    from transformers import AutoModelForCausalLM

    from inferforge.llm import fused, triton_attn
    from inferforge.llm.sampler import argmax_rows
    from inferforge.llm.tiny import make_tiny_llama

    x = torch.randn(4, 128256, device="cuda")
    x[1] = 0.0
    x[2, [7, 128000]] = 50.0
    x[3, [128254, 128255]] = 50.0
    row("two-pass argmax == torch.argmax on cuda (ties)", str(torch.equal(argmax_rows(x), x.argmax(-1))))
    row("fused kernels rel. error vs eager (bf16)", str(fused.check_against_reference(torch.device("cuda"))))
    row(
        "triton paged decode max abs err vs torch (bf16)",
        f"{triton_attn.check_against_reference(torch.device('cuda')):.2e}",
    )
    for fam in ("llama", "qwen2", "gpt2"):
        folder = make_tiny_llama(Path(f"/tmp/tiny_{fam}"), family=fam)
        hf = AutoModelForCausalLM.from_pretrained(folder).eval()
        prompts = [
            (5, 17, 99, 3),
            (200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210, 211, 212, 213, 214, 215, 216, 300),
        ]
        refs = [
            hf.generate(
                torch.tensor([p]), max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0
            )[0, len(p) :].tolist()
            for p in prompts
        ]
        for dtype in ("float32",):
            eng = LLMEngine(
                folder, EngineConfig(device="cuda", dtype=dtype, kv_cache_tokens=4096, max_num_seqs=8)
            )
            params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
            res = eng.generate([EngineRequest(str(i), p, params) for i, p in enumerate(prompts)])
            ours = [[t for o in res[str(i)][0] for t in o.new_token_ids] for i in range(len(prompts))]
            agree = sum(
                a == b for o, r in zip(ours, refs, strict=True) for a, b in zip(o, r, strict=True)
            ) / sum(len(r) for r in refs)
            first_diff = min(
                (
                    next((j for j, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(r))
                    for o, r in zip(ours, refs, strict=True)
                )
            )
            row(
                f"tiny {fam} cuda {dtype} greedy == HF fp32 CPU",
                f"{ours == refs} (agree {agree:.3f}, first diff {first_diff})",
            )
            alone = [  # one sequence: the batch-1 graph, through `gemv` where the model allows it
                [
                    t
                    for o in eng.generate([EngineRequest(f"a{i}", p, params)])[f"a{i}"][0]
                    for t in o.new_token_ids
                ]
                for i, p in enumerate(prompts)
            ]
            gemv_on = eng.model.gemv_ops is not None
            row(f"tiny {fam} cuda {dtype} batch 1 (gemv {gemv_on}) == HF fp32 CPU", str(alone == refs))
            RESULTS[f"check_{fam}_{dtype}"] = {
                "identical": ours == refs,
                "agreement": agree,
                "kernel": eng.decode_kernel,
                "batch1_identical": alone == refs,
                "batch1_gemv": gemv_on,
            }
            del eng
            free()


def check_mixed_steps() -> None:
    """Requests joining while others decode (mixed steps: decode rows and prompt chunks in one pass, tokens
    carried on the device) must generate what each generates alone, through graphs and fused kernels."""
    from inferforge.llm.tiny import make_tiny_llama

    folder = make_tiny_llama(Path("/tmp/tiny_mixed"), family="llama")
    for dtype in ("float32", "bfloat16"):
        eng = LLMEngine(
            folder, EngineConfig(device="cuda", dtype=dtype, kv_cache_tokens=4096, max_num_seqs=8)
        )
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        reqs = [EngineRequest(f"m{i}", tuple(range(30 + 7 * i, 40 + 9 * i)), params) for i in range(5)]
        alone = {
            r.request_id: [t for o in eng.generate([r])[r.request_id][0] for t in o.new_token_ids]
            for r in reqs
        }
        got: dict[str, list[int]] = {r.request_id: [] for r in reqs}
        pending, step = list(reqs), 0
        while pending or eng.has_unfinished():
            if pending and step % 3 == 0:
                eng.add_request(pending.pop(0))
            for o in eng.step():
                got[o.request_id].extend(o.new_token_ids)
            step += 1
        row(f"tiny llama cuda {dtype}: staggered arrivals == each alone", str(got == alone))
        RESULTS[f"check_mixed_{dtype}"] = got == alone
        del eng
        free()
