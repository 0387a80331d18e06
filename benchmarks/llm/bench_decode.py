"""Decode speed of the inferforge LLM engine on the Llama-3.2-1B shape (random bf16 weights), with peers.

Run on a CUDA machine (about 6 minutes for everything; each section writes its figures as it finishes):

    python benchmarks/llm/bench_decode.py --sections check,engine,load,hf,quant,compile,attention,profile

Peers in the same run: Hugging Face `generate` (default cache, `hf`) and `generate` with a static cache under
`torch.compile(mode="reduce-overhead")` (`compile`). Prints a table; writes bench_decode.json under $OUT.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_parts
from ab_sections import (
    argmax_ab,
    attn64_ab,
    attn64_tiles_ab,
    batch1_ab,
    batch64_ab,
    blas_ab,
    carveout_ab,
    early_next_tile_ab,
    int4_head_tiles_ab,
    int4_l2_prefetch_ab,
    int4_norm_ab,
    int4_recipe_ab,
    int4_tc_ab,
    int4_tc_down_ab,
    int4_tc_narrow_ab,
    int4_tc_o_ab,
    int4_tc_qkv_ab,
    int4_tc_ring2_ab,
    int4_tc_ring_ab,
    int4_tc_wide_ab,
    int4_tiles_ab,
    int4_warps_ab,
    int8_mixed_ab,
    int8_mode_tiles_ab,
    int8_pre_ab,
    int8_tiles_ab,
    l2_prefetch_ab,
    l2_prefetch_more_ab,
    l2_prefetch_small_ab,
    load_graph_buckets_ab,
    mlp_chunk_ab,
    no_attention_ab,
    o_bf16_ab,
    one_byte_tiles_ab,
    pre_convert_ab,
    quant_gemv,
    quant_start,
    residual_ab,
    row_tiles_ab,
    small_tiles_ab,
    split_ab,
    split_k_ab,
    splitk_ab,
)
from checks import check_mixed_steps, check_tiny
from common import make_random_1b, write_json
from engine_bench import (
    RESULTS,
    ROWS,
    T0,
    closed_loop,
    engine_numbers,
    hf_peer,
    load_test,
    row,
    static_compile_peer,
)
from profiles import graph_profile, int4_ring_overlap_profile, prefill_profile


def load_configs(folder: Path) -> None:
    """The 64 x 128/128 load test under the benchmark's engine settings and under the server's defaults
    (context from the model, capped at 4,096; KV cache from free memory; every decode bucket), one setting
    changed at a time, in turn: which of them costs the server's engine its tokens/s."""
    server = {"max_model_len": None, "kv_cache_tokens": None, "decode_buckets": None}
    variants = [("bench", {}), ("server defaults", server)]
    variants += [(f"bench + {k}={v}", {k: v}) for k, v in server.items()]
    variants += [("bench again", {}), ("server defaults again", server)]
    for name, knobs in variants:
        row(f"-- load config: {name}", "")
        RESULTS[f"loadcfg {name}"] = load_test(folder, None, **knobs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="check,engine,ablation,load,hf,quant,compile,attention,profile")
    ap.add_argument("--quants", default="int8,fp8,int4")
    ap.add_argument("--carveouts", default="none,100", help="carveoutab: shared-memory splits in percent")
    ap.add_argument("--reps", type=int, default=2, help="carveoutab: repetitions in turn")
    args = ap.parse_args()
    sections = set(args.sections.split(","))
    quants = args.quants.split(",")
    RESULTS.update(device=torch.cuda.get_device_name(0), torch=torch.__version__)
    folder = make_random_1b(Path("/tmp/llama1b_random"))
    steps = [
        ("check", check_tiny),
        ("mixed", check_mixed_steps),
        ("engine", lambda: RESULTS.__setitem__("bf16", engine_numbers(folder, None, (1, 64)))),
        (
            "compiled",
            lambda: RESULTS.__setitem__("bf16_compiled", engine_numbers(folder, None, (1, 64), True)),
        ),
        ("load", lambda: RESULTS.__setitem__("load_bf16", load_test(folder, None))),
        ("load8k", lambda: RESULTS.__setitem__("load_bf16_8192", load_test(folder, None, 8192))),
        (
            "loadab",
            lambda: [
                RESULTS.__setitem__(f"load_bf16_{t}_rep{r}", load_test(folder, None, t))
                for r in range(2)
                for t in (4096, 8192)
            ],
        ),
        (
            "gemvab",
            lambda: [
                RESULTS.__setitem__(
                    f"bf16_gemv={g}_pdl={p}", engine_numbers(folder, None, (1, 64), gemv_decode=g, pdl=p)
                )
                for g, p in ((False, False), (True, True))
            ],
        ),
        ("loadcfg", lambda: load_configs(folder)),
        ("blasab", lambda: blas_ab(folder)),
        ("attn64ab", lambda: attn64_ab(folder)),
        ("attn64tiles", lambda: attn64_tiles_ab(folder)),
        ("mlpchunk", lambda: mlp_chunk_ab(folder)),
        ("quantgemv", lambda: quant_gemv(folder)),
        ("splitab", lambda: split_ab(folder)),
        (
            "int4ab",
            lambda: [
                RESULTS.__setitem__(
                    f"int4ab {name}", engine_numbers(folder, q, (1,), note=f" [{name}]", **kn)
                )
                for name, q, kn in (
                    ("bf16", None, {}),
                    ("int4 gemv", "int4", {}),
                    ("int4 gemlite", "int4", {"gemv_decode": False}),
                )
            ],
        ),
        ("int4tiles", lambda: int4_tiles_ab(folder)),
        ("int8tiles", lambda: int8_tiles_ab(folder)),
        ("int8modeab", lambda: int8_mode_tiles_ab(folder)),
        ("1btilesab", lambda: one_byte_tiles_ab(folder)),
        ("earlyab", lambda: early_next_tile_ab(folder)),
        ("rowtilesab", lambda: row_tiles_ab(folder)),
        ("resab", lambda: residual_ab(folder)),
        ("smalltiles", lambda: small_tiles_ab(folder)),
        ("preab", lambda: pre_convert_ab(folder)),
        ("splitkab", lambda: splitk_ab(folder)),
        ("splitkab4", lambda: splitk_ab(folder, ("int4",))),
        ("b1ab", lambda: batch1_ab(folder)),
        ("noattnab", lambda: no_attention_ab(folder)),
        ("int4warpsab", lambda: int4_warps_ab(folder)),
        ("int4warps16ab", lambda: int4_warps_ab(folder, (8, 16), int8=False)),
        ("int4recipeab", lambda: int4_recipe_ab(folder)),
        ("int4tcab", lambda: int4_tc_ab(folder)),
        ("int4tcqkvab", lambda: int4_tc_qkv_ab(folder)),
        ("int4tcringab", lambda: int4_tc_ring_ab(folder)),
        ("int4tcdownab", lambda: int4_tc_down_ab(folder)),
        ("int4tcring2ab", lambda: int4_tc_ring2_ab(folder)),
        ("int4tcnarrowab", lambda: int4_tc_narrow_ab(folder)),
        ("int4tcoab", lambda: int4_tc_o_ab(folder)),
        ("int4tcwideab", lambda: int4_tc_wide_ab(folder)),
        ("int4normab", lambda: int4_norm_ab(folder)),
        ("int8mixedab", lambda: int8_mixed_ab(folder)),
        ("obf16ab", lambda: o_bf16_ab(folder)),
        ("int8preab", lambda: int8_pre_ab(folder)),
        ("argmaxab", lambda: argmax_ab(folder)),
        ("int8predownab", lambda: int8_pre_ab(folder, only=("o", "o+down"))),
        ("l2pfab", lambda: l2_prefetch_ab(folder)),
        ("l2pfsmallab", lambda: l2_prefetch_small_ab(folder)),
        ("l2pfmoreab", lambda: l2_prefetch_more_ab(folder)),
        ("int4l2pfab", lambda: int4_l2_prefetch_ab(folder)),
        ("loadgraphab", lambda: load_graph_buckets_ab(folder)),
        ("int4headab", lambda: int4_head_tiles_ab(folder)),
        ("splitdownab", lambda: split_k_ab(folder, tuple(None if q == "bf16" else q for q in quants))),
        (
            "carveoutab",
            lambda: carveout_ab(
                folder,
                tuple(None if q == "bf16" else q for q in quants),
                tuple(None if p == "none" else int(p) for p in args.carveouts.split(",")),
                args.reps,
            ),
        ),
        ("graphprof", lambda: graph_profile(folder)),
        ("graphprof64", lambda: graph_profile(folder, 64)),
        ("graphprofq", lambda: [graph_profile(folder, 1, q) for q in ("int8", "int4")]),
        ("int4overlap", lambda: int4_ring_overlap_profile(folder)),
        ("b64ab", lambda: batch64_ab(folder)),
        ("prefillprof", lambda: prefill_profile(folder)),
        ("quantstart", lambda: quant_start(folder)),
        (
            "closedab",
            lambda: [
                RESULTS.__setitem__(f"closed_loop_mixed={m}_{k}", closed_loop(folder, m))
                for k in range(2)
                for m in (False, True)
            ],
        ),
        (
            "mixedab",
            lambda: [
                RESULTS.__setitem__(f"load_{n}_mixed={m}", load_test(folder, None, n, mixed_steps=m))
                for n in (2048, 8192)
                for m in (False, True, False, True)
            ],
        ),
        (
            "ablation",
            lambda: [
                RESULTS.__setitem__(
                    f"bf16_fused={f}_overlap={o}",
                    engine_numbers(folder, None, (1, 64), fused_kernels=f, overlap_decode=o),
                )
                for f, o in ((False, False), (True, False))
            ],
        ),
        ("hf", lambda: RESULTS.__setitem__("hf_generate_tok_s", hf_peer(folder, False))),
        ("quant", lambda: [RESULTS.__setitem__(q, engine_numbers(folder, q, (1, 64))) for q in quants]),
        ("compile", lambda: RESULTS.__setitem__("static_compile_peer_tok_s", static_compile_peer(folder))),
        ("attention", lambda: RESULTS.__setitem__("attention_us", bench_parts.attention_section(row))),
        ("profile", lambda: RESULTS.__setitem__("profile", bench_parts.profile_section(folder, row))),
    ]
    for name, fn in steps:
        if name in sections:
            row(f"-- section {name} starts at (s)", f"{time.perf_counter() - T0:.0f}")
            try:
                fn()
            except Exception:
                traceback.print_exc()
                RESULTS[f"error_{name}"] = traceback.format_exc()
            write_json("bench_decode.json", RESULTS)
    print("\n".join(f"{a:58s} {b}" for a, b in ROWS))


if __name__ == "__main__":
    main()
