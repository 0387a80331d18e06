"""The A/B sections of `bench_decode.py`: one change at a time, each setting in its own engine, repeated in
turn; every figure of docs/llm-runs.md that compares two settings comes from one of these.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import free
from engine_bench import RESULTS, bench_engine, decode_rate, engine_numbers, load_test, row


def batch1_ab(folder: Path) -> None:
    """Batch-1 bf16 decode, one change at a time, twice in turn: when a kernel lets the next one launch
    (at its start or after its wait), the down product's tiles."""
    from inferforge.llm import fused, gemv

    variants = {
        "default": (True, None),
        "trigger after wait": (False, None),
        "down tiles 4x4096 w8": (True, gemv.TileConfig(4, 4096, 8)),
        "down tiles 16x1024 w4": (True, gemv.TileConfig(16, 1024, 4)),
    }
    for rep in range(2):
        for name, (early, down) in variants.items():
            fused._LAUNCH["early_trigger"] = early
            gemv.TUNED.clear()
            if down is not None:
                gemv.TUNED[(2048, 8192, 2)] = down
            RESULTS[f"b1ab {name} rep{rep}"] = engine_numbers(folder, None, (1,), note=f" [{name}]")
    fused._LAUNCH["early_trigger"] = False
    gemv.TUNED.clear()


def split_ab(folder: Path) -> None:
    """Batch-1 bf16 decode with split-KV attention off (one program per KV head) and on, twice in turn, at a
    short context (16-token prompts, as `decode_rate`) and a long one (3,000-token prompts): tokens/s of 256
    generated tokens. One engine per setting (the split count is fixed when a graph is captured)."""
    from inferforge.llm import triton_attn

    default = triton_attn.MAX_SPLITS
    for rep in range(2):
        for name, splits in (("split off", 1), ("split on", default)):
            triton_attn.MAX_SPLITS = splits
            eng = bench_engine(folder, None, decode_buckets=(1,), max_model_len=4096,
                               kv_cache_tokens=16 * 4096, max_num_batched_tokens=4096)  # fmt: skip
            decode_rate(eng, 1, new_tokens=32)  # warm-up
            short = decode_rate(eng, 1)
            long = decode_rate(eng, 1, prompt_len=3000)
            RESULTS[f"splitab {name} rep{rep}"] = {"short_tok_s": short, "long3000_tok_s": long}
            row(f"b1 bf16 [{name}] ctx 16-272 / 3000-3256 (tok/s)", f"{short:,.0f} / {long:,.0f}")
            del eng
            free()
    triton_attn.MAX_SPLITS = default


INT4_TILES = {
    "bn16": {(3072, 2048): (16, 2048, 4), (2048, 2048): (16, 1024, 4), (16384, 2048): (16, 2048, 4),
             (2048, 8192): (16, 1024, 4), (128256, 2048): (16, 2048, 4)},
    "bn32": {(3072, 2048): (32, 2048, 8), (2048, 2048): (32, 512, 4), (16384, 2048): (32, 2048, 8),
             (2048, 8192): (32, 512, 4), (128256, 2048): (32, 2048, 8)},
}  # fmt: skip


def int4_tiles_ab(folder: Path) -> None:
    """int4 batch-1 decode with `gemv_int4`'s default 8-column tiles (32 bytes of each packed row) against 16
    and 32 columns (64 and 128 bytes: whole sectors / lines of the [K/8, N] layout), twice in turn; bf16 once
    for the ratio. Tiles that compile without spills for sm_90 (read offline)."""
    from inferforge.llm import gemv, gemv_int4

    RESULTS["int4tiles bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for rep in range(2):
        for name in ("default", *INT4_TILES):
            gemv_int4.TUNED.clear()
            for key, (bn, bk, w) in INT4_TILES.get(name, {}).items():
                gemv_int4.TUNED[key] = gemv.TileConfig(bn, bk, w)
            RESULTS[f"int4tiles {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
    gemv_int4.TUNED.clear()


# int8 (1-byte) tiles tried inside the batch-1 decode step: (rows, K columns, warps) for K = 2048 shapes and
# for down (K = 8192); the default is `gemv.default_tiles` (16 x 2048 / 8 x 4096, 4 warps).
INT8_TILES = {
    "default": None,
    "8 warps": ((16, 2048, 8), (8, 4096, 8)),
    "half tiles": ((8, 2048, 4), (4, 4096, 4)),
    "double tiles 8 warps": ((32, 2048, 8), (16, 4096, 8)),
}


def int8_tiles_ab(folder: Path) -> None:
    """int8 batch-1 decode with `gemv`'s default 1-byte tiles and three others applied to every product
    (q/k/v, o, gate/up, down, LM head), twice in turn; never tried inside the step before (the bf16 sweep of
    bench_gemv.py picked the defaults)."""
    from inferforge.llm import gemv

    shapes = {(3072, 2048), (2048, 2048), (16384, 2048), (128256, 2048)}
    for rep in range(2):
        for name, tiles in INT8_TILES.items():
            gemv.TUNED.clear()
            if tiles is not None:
                (bn, bk, w), (dn, dk, dw) = tiles
                gemv.TUNED.update({(n, k, 1): gemv.TileConfig(bn, bk, w) for n, k in shapes})
                gemv.TUNED[(2048, 8192, 1)] = gemv.TileConfig(dn, dk, dw)
            RESULTS[f"int8tiles {name} rep{rep}"] = engine_numbers(folder, "int8", (1,), note=f" [{name}]")
    gemv.TUNED.clear()


# Per-shape tiles for the small products (G8's timeline: int8's o product adds 5.0 us to the step against
# bf16's 2.5, q/k/v 3.8 against 2.8: each program converts twice bf16's weights a thread after its wait).
SMALL_TILES = {
    ("int8", "qkv+o 8 rows"): {(3072, 2048, 1): (8, 2048, 4), (2048, 2048, 1): (8, 2048, 4)},
    ("int8", "qkv+o 4 rows"): {(3072, 2048, 1): (4, 2048, 4), (2048, 2048, 1): (4, 2048, 4)},
    ("int8", "qkv+o 8 rows, down 4 rows"): {(3072, 2048, 1): (8, 2048, 4), (2048, 2048, 1): (8, 2048, 4),
                                            (2048, 8192, 1): (4, 4096, 4)},
    ("int4", "qkv+o 8 warps"): {(3072, 2048): (8, 2048, 8), (2048, 2048): (8, 2048, 8)},
}  # fmt: skip


def small_tiles_ab(folder: Path) -> None:
    """int8 and int4 batch-1 decode with the default tiles and with smaller ones (or more warps) for the q/k/v
    and o products only, twice in turn."""
    from inferforge.llm import gemv, gemv_int4

    for rep in range(2):
        for quant in ("int8", "int4"):
            for name in ("default", *(n for q, n in SMALL_TILES if q == quant)):
                gemv.TUNED.clear()
                gemv_int4.TUNED.clear()
                table = gemv.TUNED if quant == "int8" else gemv_int4.TUNED
                for key, (bn, bk, w) in SMALL_TILES.get((quant, name), {}).items():
                    table[key] = gemv.TileConfig(bn, bk, w)  # type: ignore[index]
                RESULTS[f"smalltiles {quant} {name} rep{rep}"] = engine_numbers(
                    folder, quant, (1,), note=f" [{name}]"
                )
    gemv.TUNED.clear()
    gemv_int4.TUNED.clear()


def pre_convert_ab(folder: Path) -> None:
    """int8 and fp8 batch-1 decode with each program's first weight tile rebuilt as fp16 before its wait
    (`gemv.PRE_CONVERT`) and after it, twice in turn."""
    from inferforge.llm import gemv

    default = dict(gemv.PRE_CONVERT)
    for rep in range(2):
        for quant in ("int8", "fp8"):
            for on in (False, True):
                gemv.PRE_CONVERT[quant] = on
                RESULTS[f"preab {quant} {on} rep{rep}"] = engine_numbers(
                    folder, quant, (1,), note=f" [convert before wait {on}]"
                )
    gemv.PRE_CONVERT.update(default)


def splitk_ab(folder: Path, formats: tuple[str, ...] = ("int8", "fp8")) -> None:
    """int8 and fp8 engines at batch 64 with gemlite's own kernel choice and with split-K for the narrow
    products (`quant.SPLITK_NARROW`), twice in turn; bf16 once for the ratio."""
    from inferforge.llm import quant

    RESULTS["splitk bf16"] = engine_numbers(folder, None, (64,), note=" [bf16]")
    default = dict(quant.SPLITK_NARROW)
    for rep in range(2):
        for fmt in formats:
            for on in (False, True):
                quant.SPLITK_NARROW.update(on=on, formats=(fmt,))
                RESULTS[f"splitk {fmt} {on} rep{rep}"] = engine_numbers(
                    folder, fmt, (64,), note=f" [split-K narrow {on}]"
                )
    quant.SPLITK_NARROW.update(default)


def quant_start(folder: Path, fmt: str = "int8") -> None:
    """Start a quantized engine in a fresh process twice with an empty cache folder: the first tunes gemlite's
    kernels and writes their configurations, the second reads them (`llm/quant.py`)."""
    import os
    import subprocess
    import sys
    import tempfile

    code = (
        "import time; t0 = time.perf_counter(); from inferforge.llm.engine import EngineConfig, LLMEngine; "
        f"LLMEngine({str(folder)!r}, EngineConfig(device='cuda', quant={fmt!r}, max_num_seqs=64, "
        "kv_cache_tokens=64 * 640, max_model_len=1024, experimental_quant=True, decode_buckets=(1, 64))); "
        "print(f'START {time.perf_counter() - t0:.1f}')"
    )
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "INFERFORGE_CACHE": cache}
        for label in ("cold (tunes, writes the file)", "warm (reads the file)"):
            res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            seconds = next(
                (ln.split()[1] for ln in res.stdout.splitlines() if ln.startswith("START")), "failed"
            )
            RESULTS[f"quant_start_{fmt}_{label.split()[0]}_s"] = seconds
            row(f"engine {fmt} start, {label} (s)", seconds if seconds != "failed" else res.stderr[-300:])


def batch64_ab(folder: Path) -> None:
    """Batch-64 bf16 decode, twice in turn: logits written as fp32 by the GEMM or converted after it
    (run 6 also compared a pipelined attention loop: no faster, removed)."""
    variants = {"default": {}, "logits bf16 then fp32": {"fp32_logits_mm": False}}
    for rep in range(2):
        for name, knobs in variants.items():
            RESULTS[f"b64ab {name} rep{rep}"] = engine_numbers(
                folder, None, (64,), note=f" [{name}]", **knobs
            )


def quant_gemv(folder: Path) -> None:
    """int8 and fp8 (gemlite layers) at batch 1, the decode GEMVs reading the same bytes, for each way int8
    becomes fp32 in the kernel (`gemv._weights_f32`); gemlite's own batch-1 kernels as the peer."""
    from inferforge.llm import gemv, gemv_int4

    for mode in (6, 3):
        gemv.INT8_MODE["mode"] = mode
        RESULTS[f"int8_gemv_mode{mode}"] = engine_numbers(
            folder, "int8", (1,), note=f" gemv int8 mode {mode}"
        )
    gemv.INT8_MODE["mode"] = 6
    RESULTS["fp8_gemv"] = engine_numbers(folder, "fp8", (1,))
    for ptx in (True, False):
        gemv_int4.PTX_NIBBLES["on"] = ptx
        RESULTS[f"int4_gemv_ptx{ptx}"] = engine_numbers(folder, "int4", (1,), note=f" gemv int4 ptx {ptx}")
    gemv_int4.PTX_NIBBLES["on"] = True
    RESULTS["int8_gemlite"] = engine_numbers(folder, "int8", (1,), gemv_decode=False)
    RESULTS["fp8_gemlite"] = engine_numbers(folder, "fp8", (1,), gemv_decode=False)


def blas_ab(folder: Path) -> None:
    """The load test with cuBLAS and with cuBLASLt as torch's GEMM library (each picks its own kernels for
    the batch-64 products, e.g. split-K with a separate reduce or not), twice in turn."""
    for rep in range(2):
        for lib in ("cublas", "cublaslt"):
            RESULTS[f"blasab {lib} rep{rep}"] = load_test(folder, None, 8192, gemm_library=lib)


def attn64_ab(folder: Path) -> None:
    """The load test (cuBLASLt, the engine's default) with batch-64 decode attention unsplit (two grid waves:
    one program per sequence and KV head) and split over 2 or 3 programs per (sequence, KV head) down to 64
    tokens each, twice in turn."""
    from inferforge.llm import triton_attn

    variants = {"unsplit": (2, 0), "waves 6 min 64": (6, 64), "waves 8 min 64": (8, 64)}
    for rep in range(2):
        for name, (waves, tokens) in variants.items():
            triton_attn.LARGE_BATCH_SPLIT.update(waves=waves, min_tokens=tokens)
            RESULTS[f"attn64ab {name} rep{rep}"] = load_test(folder, None, 8192)
            row(f"  [{name}]", "")
    triton_attn.LARGE_BATCH_SPLIT.update(waves=2, min_tokens=0)


def mlp_chunk_ab(folder: Path) -> None:
    """The load test with its 8,192-token prefill's MLP in one pass and in chunks of 2,048 and 1,024 tokens
    (`model.MLP_CHUNK`), twice in turn; its `prefill_ms` is what changes."""
    from inferforge.llm import model

    for rep in range(2):
        for tokens in (0, 2048, 1024):
            model.MLP_CHUNK["tokens"] = tokens
            RESULTS[f"mlpchunk {tokens} rep{rep}"] = load_test(folder, None, 8192)
            row(f"  [MLP chunk {tokens}]", "")
    model.MLP_CHUNK["tokens"] = 0


def int8_mode_tiles_ab(folder: Path) -> None:
    """int8 batch-1 decode with gemv's int8 conversion (`gemv.INT8_MODE`: 3, or 6 in PTX) crossed with the
    default tiles and 8-row tiles for every product but the LM head, twice in turn. bench_int8_diag.py (run
    H2 of 2026-11-23, no PDL): gate/up took 17.5 us in mode 3 at 16 rows, 14.1 in mode 6 at 8 rows; the raw
    bytes alone 13.0; F2 had tried mode 6 at the default tiles only."""
    from inferforge.llm import gemv

    eight = {(n, k, 1): gemv.TileConfig(8, 2048, 4) for n, k in ((3072, 2048), (2048, 2048), (16384, 2048))}
    eight[(2048, 8192, 1)] = gemv.TileConfig(8, 2048, 4)
    default_mode = gemv.INT8_MODE["mode"]
    for rep in range(2):
        for mode, tiles in ((3, None), (6, None), (6, "8 rows"), (3, "8 rows")):
            gemv.INT8_MODE["mode"] = mode
            gemv.TUNED.clear()
            if tiles:
                gemv.TUNED.update(eight)
            note = f" [mode {mode}, {tiles or 'default tiles'}]"
            RESULTS[f"int8mode {mode} {tiles} rep{rep}"] = engine_numbers(folder, "int8", (1,), note=note)
    gemv.INT8_MODE["mode"] = default_mode
    gemv.TUNED.clear()


def _rows_tiles(rows: int, down: tuple[int, int], lm_head: bool = False) -> dict:
    from inferforge.llm import gemv

    shapes = [(3072, 2048), (2048, 2048), (16384, 2048)] + ([(128256, 2048)] if lm_head else [])
    tiles = {(n, k, 1): gemv.TileConfig(rows, 2048, 4) for n, k in shapes}
    tiles[(2048, 8192, 1)] = gemv.TileConfig(down[0], down[1], 4)
    return tiles


def one_byte_tiles_ab(folder: Path) -> None:
    """After int8modeab (H3): int8 in mode 6 with 8-row tiles (the LM head at its default 16), against the LM
    head at 8 rows too, 4-row tiles for the 2048-wide products, 4-row tiles for down; fp8 at its default and
    at 8-row tiles; twice in turn. Then the int8 timeline of the first."""
    from inferforge.llm import gemv

    variants = {
        ("int8", "8 rows"): _rows_tiles(8, (8, 2048)),
        ("int8", "8 rows + LM head"): _rows_tiles(8, (8, 2048), lm_head=True),
        ("int8", "4 rows, down 8"): _rows_tiles(4, (8, 2048)),
        ("int8", "8 rows, down 4"): _rows_tiles(8, (4, 2048)),
        ("fp8", "default"): {},
        ("fp8", "8 rows"): _rows_tiles(8, (8, 2048)),
    }
    default_mode = gemv.INT8_MODE["mode"]
    gemv.INT8_MODE["mode"] = 6
    for rep in range(2):
        for (quant, name), tiles in variants.items():
            gemv.TUNED.clear()
            gemv.TUNED.update(tiles)
            key = f"1btiles {quant} {name} rep{rep}"
            RESULTS[key] = engine_numbers(folder, quant, (1,), note=f" [{name}]")
    gemv.TUNED.clear()
    gemv.TUNED.update(variants[("int8", "8 rows")])
    from profiles import graph_profile

    graph_profile(folder, 1, "int8")
    gemv.TUNED.clear()
    gemv.INT8_MODE["mode"] = default_mode


def early_next_tile_ab(folder: Path) -> None:
    """Batch-1 decode with the next K tile's load issued before (`gemv.EARLY_NEXT_TILE` on) or after the
    current tile's product, for bf16, int8 and fp8, twice in turn (down is the product of several tiles; the
    others have one). H5 also had int4, with the same change in `gemv_int4` (at 6b529d9)."""
    from inferforge.llm import gemv

    default = dict(gemv.EARLY_NEXT_TILE)
    for rep in range(2):
        for quant in (None, "int8", "fp8"):
            for on in (False, True):
                gemv.EARLY_NEXT_TILE[quant or "bf16"] = on
                key = f"earlyab {quant or 'bf16'} {on} rep{rep}"
                RESULTS[key] = engine_numbers(folder, quant, (1,), note=f" [early next tile {on}]")
    gemv.EARLY_NEXT_TILE.update(default)


# Whole-row tiles for down (K = 8192): every program's weights in one tile, loaded before its wait, instead of
# four tiles of 2048 whose last three are fetched one after another after it; smaller tiles for o.
ROW_TILES = {
    ("int8", "default"): {},
    ("int8", "down 2 x 8192"): {(2048, 8192, 1): (2, 8192, 4)},
    ("int8", "down 4 x 8192"): {(2048, 8192, 1): (4, 8192, 4)},
    ("int8", "down 4 x 8192 w8"): {(2048, 8192, 1): (4, 8192, 8)},
    ("int8", "o 4 rows"): {(2048, 2048, 1): (4, 2048, 4)},
    ("int8", "o 2 rows, down 2 x 8192"): {(2048, 2048, 1): (2, 2048, 4), (2048, 8192, 1): (2, 8192, 4)},
    ("bf16", "default"): {},
    ("bf16", "down 2 x 8192"): {(2048, 8192, 2): (2, 8192, 4)},
    ("bf16", "down 2 x 8192 w8"): {(2048, 8192, 2): (2, 8192, 8)},
}


def row_tiles_ab(folder: Path) -> None:
    """int8 and bf16 batch-1 decode with `ROW_TILES`, twice in turn."""
    from inferforge.llm import gemv

    for rep in range(2):
        for (quant, name), tiles in ROW_TILES.items():
            gemv.TUNED.clear()
            gemv.TUNED.update({key: gemv.TileConfig(*cfg) for key, cfg in tiles.items()})
            key = f"rowtiles {quant} {name} rep{rep}"
            RESULTS[key] = engine_numbers(folder, None if quant == "bf16" else quant, (1,), note=f" [{name}]")
    gemv.TUNED.clear()


def residual_ab(folder: Path) -> None:
    """Batch-1 decode with o's and down's residual read before their wait (`gemv.RESIDUAL_BEFORE_WAIT`) and
    after it, for bf16, int8, fp8 and int4, twice in turn."""
    from inferforge.llm import gemv

    for rep in range(2):
        for quant in (None, "int8", "fp8", "int4"):
            for on in (False, True):
                gemv.RESIDUAL_BEFORE_WAIT["on"] = on
                key = f"resab {quant or 'bf16'} {on} rep{rep}"
                RESULTS[key] = engine_numbers(folder, quant, (1,), note=f" [residual before wait {on}]")
    gemv.RESIDUAL_BEFORE_WAIT["on"] = True


def carveout_ab(
    folder: Path,
    quants: tuple[str | None, ...] = (None, "int8", "int4"),
    percents: tuple[int | None, ...] = (None, 100),
    reps: int = 2,
) -> None:
    """Batch-1 decode with the driver's shared-memory split per kernel against one split (100: most shared
    memory) for every Triton kernel of the package (`carveout.set_carveout`), twice in turn per format: does
    a kernel whose split differs from its predecessor's lose the early start that PDL gives it?"""
    import carveout

    for rep in range(reps):
        for quant in quants:
            for percent in percents:
                changed = carveout.set_carveout(percent)
                key = f"carveout {quant or 'bf16'} {percent} rep{rep}"
                RESULTS[key] = engine_numbers(folder, quant, (1,), note=f" [carveout {percent}, {changed}]")
    carveout.set_carveout(None)


def split_k_ab(folder: Path, quants: tuple[str | None, ...] = ("int8", None, "fp8")) -> None:
    """Batch-1 decode with the down product in one program per row block (`gemv.SPLIT_K` 1) against 2 and 4
    programs sharing its K tiles, and (int8) 2 with o in two K tiles so that it splits too; twice in turn per
    format (after K1's Nsight reading: int8 down at 49% of DRAM peak, o at 25%)."""
    from inferforge.llm import gemv

    default = dict(gemv.SPLIT_K)
    o_halves = {(2048, 2048, 1): gemv.TileConfig(16, 1024, 4)}  # int8 o in two K tiles, so it splits too
    variants = [(1, {}), (2, {}), (4, {}), (2, o_halves)]
    for rep in range(2):
        for quant in quants:
            for split, tiles in variants:
                if tiles and quant != "int8":
                    continue
                gemv.SPLIT_K[quant or "bf16"] = split
                gemv.TUNED.clear()
                gemv.TUNED.update(tiles)
                name = f"{split}{' + o 16 x 1024' if tiles else ''}"
                key = f"splitk {quant or 'bf16'} {name} rep{rep}"
                RESULTS[key] = engine_numbers(folder, quant, (1,), note=f" [split-K {name}]")
            gemv.SPLIT_K.update(default)
            gemv.TUNED.clear()


def no_attention_ab(folder: Path, quants: tuple[str | None, ...] = ("int8", None)) -> None:
    """What the decode attention costs inside the batch-1 chain, the most that fusing it into the q/k/v
    product could save: batch-1 graphs with the attention call as it is, and with it replaced by q itself
    (o then reads q: wrong tokens, right shapes, timing only), twice in turn per format."""
    from inferforge.llm import model

    real = model.Attention.decode
    for rep in range(2):
        for quant in quants:
            for skip in (False, True):
                model.Attention.decode = (lambda self, q, meta: q) if skip else real  # type: ignore[method-assign]
                key = f"noattn {quant or 'bf16'} {'skipped' if skip else 'kept'} rep{rep}"
                note = " [attention skipped: timing only]" if skip else " [attention kept]"
                RESULTS[key] = engine_numbers(folder, quant, (1,), note=note)
    model.Attention.decode = real  # type: ignore[method-assign]


# int4 (`gemv_int4`) warps per program at the default 8-column tiles, for the five products of the 1.2B shape
# (q/k/v, o, gate/up, down, LM head). Read offline for sm_90 (benchmarks/llm/offline_sass.py --format int4):
# 4 warps hold 96-126 registers a thread (16 warps an SM), 8 warps 61-64 (32 warps an SM), 16 warps 42-64,
# no spills.
INT4_WARPS = {"8 warps (default since L4)": 8, "16 warps": 16, "4 warps": 4}
# int8 (`gemv`, 16 KB tiles of 8 rows x 2,048) the same way: 4 warps hold 64-157 registers a thread (down 157:
# 3 programs an SM at most), 8 warps 48-102 (sm_90, read offline).
INT8_WARPS = {
    "4 warps (default)": {},
    "8 warps": dict.fromkeys([(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)], 8),
    "8 warps for down": {(2048, 8192): 8},
}


def int4_warps_ab(folder: Path, int4_warps: tuple[int, ...] = (8, 16, 4), int8: bool = True) -> None:
    """int4 batch-1 decode with 8 warps a program (the default since L4), 16 and 4, and int8 with 4 (its
    default) against 8, twice in turn; bf16 once for the ratio. Why: Nsight Compute (L2 of 2026-11-23) read
    the int4 GEMVs at 14-43% of DRAM peak with 12-24% achieved occupancy: latency-bound; 8 warps halve each
    thread's work and double the warps an SM."""
    from inferforge.llm import gemv, gemv_int4

    if int8:
        RESULTS["int4warps bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for rep in range(2):
        for name, warps in INT4_WARPS.items():
            if warps not in int4_warps:
                continue
            gemv_int4.WARPS["warps"] = warps
            RESULTS[f"int4warps {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
        for name, warps in INT8_WARPS.items():
            if not int8:
                continue
            gemv.TUNED.clear()
            for (n, k), w in warps.items():
                gemv.TUNED[(n, k, 1)] = gemv.TileConfig(8, 2048, w)
            RESULTS[f"int8warps {name} rep{rep}"] = engine_numbers(folder, "int8", (1,), note=f" [{name}]")
    gemv_int4.WARPS["warps"] = 8
    gemv.TUNED.clear()


# int4 recipes (`quant.INT4_RECIPE`): groups of 128 instead of 64 (half the scales and zeros, half the
# per-group work in `gemv_int4`), and the LM head in int8 (`gemv`'s int8 head read at 89% of DRAM peak alone,
# K1, where int4's read at 43%, L2). Each changes quality too:
# `train_small_llama.py --formats int4,int4-g128,int4-head8`.
INT4_RECIPES = {
    "groups of 64, int4 head (default)": {},
    "groups of 128": {"group": 128},
    "int8 LM head": {"lm_head": "int8"},
}


def int4_recipe_ab(folder: Path) -> None:
    """int4 batch-1 decode with each recipe of `INT4_RECIPES`, twice in turn; bf16 once for the ratio."""
    from inferforge.llm import quant

    RESULTS["int4recipe bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    _int4_in_turn(folder, "int4recipe", quant.INT4_RECIPE, INT4_RECIPES)


def _int4_in_turn(folder: Path, prefix: str, table: dict, variants: dict[str, dict], reps: int = 2) -> None:
    """An int4 engine per variant, `reps` rounds in turn; each variant is `table` updated with its entries,
    and the table is restored afterwards."""
    saved = dict(table)
    for rep in range(reps):
        for name, change in variants.items():
            table.update(saved)
            table.update(change)
            RESULTS[f"{prefix} {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
    table.update(saved)


def _int4_tiles_in_turn(folder: Path, prefix: str, variants: dict[str, dict], reps: int = 2) -> None:
    """bf16 once, then an int4 engine per `cuda_int4.TUNED` variant, `reps` rounds in turn."""
    from inferforge.llm import cuda_int4

    RESULTS[f"{prefix} bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    _int4_in_turn(folder, prefix, cuda_int4.TUNED, variants, reps)


def int4_tc_down_ab(folder: Path) -> None:
    """After N2 (down on the 8-stage ring: 605-608 -> 564-567 us): down's other tiles in the step, and q/k/v
    on the tensor-core kernel beside down's ring, in turn; bf16 once."""

    down = (2048, 8192)
    variants = {
        "down 1x16 ring 8": {down: (1, 16, 8)},
        "down 2x16 ring 4": {down: (2, 16, 4)},
        "down 2x16": {down: (2, 16)},
        "down ring 8, qkv 2x16": {down: (1, 16, 8), (3072, 2048): (2, 16)},
    }
    _int4_tiles_in_turn(folder, "int4tcdown", variants)


def int4_tc_ring2_ab(folder: Path) -> None:
    """After N3 (down on the 8-stage ring in `cuda_int4.TUNED`): shorter rings for down, and rings for gate/up
    and the LM head (their whole K range in shared memory blocks the next kernel's programs under PDL, the
    footprint hypothesis), in turn against the step as it runs; bf16 once."""

    down, w13, head = (2048, 8192), (16384, 2048), (128256, 2048)
    variants = {
        "as run": {},
        "down 1x16 ring 4": {down: (1, 16, 4)},
        "down 1x16 ring 2": {down: (1, 16, 2)},
        "down 1x8 ring 8": {down: (1, 8, 8)},
        "gate/up ring 4": {w13: (4, 8, 4)},
        "gate/up ring 2": {w13: (4, 8, 2)},
        "gate/up and head ring 4": {w13: (4, 8, 4), head: (4, 8, 4)},
    }
    _int4_tiles_in_turn(folder, "int4tcring2", variants)


def int4_tc_narrow_ab(folder: Path) -> None:
    """After N4 (gate/up, the LM head and down on rings of 4 in `cuda_int4.TUNED`): q/k/v and o on the
    tensor-core kernel again, now that no neighbour holds a whole K range in shared memory; in turn against
    the step as it runs; bf16 once."""

    qkv, o, down = (3072, 2048), (2048, 2048), (2048, 8192)
    variants = {
        "as run": {},
        "qkv 2x16 ring 4": {qkv: (2, 16, 4)},
        "qkv 2x16": {qkv: (2, 16)},
        "o 1x8 ring 4": {o: (1, 8, 4)},
        "o 2x16 ring 4": {o: (2, 16, 4)},
        "down 1x16 ring 8": {down: (1, 16, 8)},
    }
    _int4_tiles_in_turn(folder, "int4tcnarrow", variants)


def int4_tc_o_ab(folder: Path) -> None:
    """N5 left o on a ring (2 x 16, 4 stages) 1-4 us ahead of the step as it runs (518-522 against 522-524):
    three rounds in turn to tell; bf16 once."""

    variants = {"as run": {}, "o 2x16 ring 4": {(2048, 2048): (2, 16, 4)}}
    _int4_tiles_in_turn(folder, "int4tco", variants, reps=3)


def int4_tc_wide_ab(folder: Path) -> None:
    """After N6 (o's ring within noise, left on Triton): wider tiles for gate/up and the LM head on rings of 4
    (16 warps, or 128 rows a program), in turn against the step as it runs; bf16 once. Ran once (N7): both
    lost, and (8, 8, 4) computed wrong results (N10: fixed by refusing MT 8 at build time), so both were
    taken out of `cuda_int4.CONFIGS` again; rerunning this needs (4, 16, 4) built back in (`IF_CASE`)."""

    w13, head = (16384, 2048), (128256, 2048)
    variants = {
        "as run": {},
        "gate/up 4x16 ring 4": {w13: (4, 16, 4)},
        "gate/up 8x8 ring 4": {w13: (8, 8, 4)},
        "head 8x8 ring 4": {head: (8, 8, 4)},
    }
    _int4_tiles_in_turn(folder, "int4tcwide", variants)


def int4_tc_ab(folder: Path) -> None:
    """int4 batch-1 decode with the tensor-core GEMV for the wide products (`cuda_int4`, gate/up and the LM
    head) against the Triton one alone, in turn: on, off, on; bf16 once for the ratio."""
    from inferforge.llm import cuda_int4, kernels

    RESULTS["int4tc bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for rep, on in enumerate((True, False, True)):
        kernels.INT4_TC["on"] = on
        note = " [tensor-core wide products]" if on else " [Triton int4 only]"
        RESULTS[f"int4tc {'on' if on else 'off'} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=note)
        RESULTS[f"int4tc {'on' if on else 'off'} rep{rep}"]["tc_state"] = dict(cuda_int4.STATE)
    kernels.INT4_TC["on"] = True


def int4_tc_qkv_ab(folder: Path) -> None:
    """The tensor-core GEMV also for q/k/v (RMSNorm prologue, RoPE + cache epilogue; 16 rows a program,
    8 warps) against it for the wide products only and against the Triton kernel alone, in turn; bf16 once."""
    from inferforge.llm import cuda_int4, kernels

    RESULTS["int4tcqkv bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    variants = {"wide + q/k/v": True, "wide only": False, "Triton only": None}
    for rep in range(2):
        for name, qkv in variants.items():
            kernels.INT4_TC["on"] = qkv is not None
            cuda_int4.TUNED[(3072, 2048)] = (1, 8) if qkv else None
            RESULTS[f"int4tcqkv {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
    kernels.INT4_TC["on"] = True
    cuda_int4.TUNED[(3072, 2048)] = None


def int4_tc_ring_ab(folder: Path) -> None:
    """Staged after M7: the tensor-core kernel's ring of shared-memory stages (`cuda_int4.CONFIGS` with a
    third number) for the narrow products inside the step: down alone, then o and down, against the step as
    it runs (gate/up and the LM head only), in turn; bf16 once."""

    variants = {
        "as run": {},
        "down on a 8-stage ring": {(2048, 8192): (1, 16, 8)},
        "o and down on rings": {(2048, 8192): (1, 16, 8), (2048, 2048): (1, 8, 4)},
    }
    _int4_tiles_in_turn(folder, "int4tcring", variants)


# Batch-64 decode attention tiles (keys a loop iteration, warps a program), O-series: the 64 x (128 + 128)
# load test, the target's own figure, with each; (64, 4) is `triton_attn`'s large-batch default (run 5 of
# 2026-11-22, measured in the decode step at batch 64 then).
ATTN64_TILES = {"64 keys, 4 warps": (64, 4), "128, 4": (128, 4), "128, 8": (128, 8), "32, 4": (32, 4),
                "64, 2": (64, 2), "64, 8": (64, 8)}  # fmt: skip


def attn64_tiles_ab(folder: Path, reps: int = 2) -> None:
    """The load test (8,192 tokens a step) with each `ATTN64_TILES` entry, `reps` rounds in turn."""
    from inferforge.llm import triton_attn

    saved = (triton_attn.TILE["large_batch"], triton_attn.WARPS["large_batch"])
    for rep in range(reps):
        for name, (tile, warps) in ATTN64_TILES.items():
            triton_attn.TILE["large_batch"], triton_attn.WARPS["large_batch"] = tile, warps
            RESULTS[f"attn64tiles {name} rep{rep}"] = load_test(folder, None, 8192)
            row(f"  [{name}]", "")
    triton_attn.TILE["large_batch"], triton_attn.WARPS["large_batch"] = saved


def int4_norm_ab(folder: Path, reps: int = 3) -> None:
    """The int4 batch-1 step with the tensor-core kernel's RMSNorm sum of squares read by every warp and
    split over a program's warps (`cuda_int4.NORM`, the default since O7), `reps` rounds in turn; bf16
    once. O7 ran it with the whole-row read as the default ("as run" there)."""
    from inferforge.llm import cuda_int4

    RESULTS["int4norm bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    default = cuda_int4.NORM["shared"]
    for rep in range(reps):
        for shared in (False, True):
            cuda_int4.NORM["shared"] = shared
            name = "norm shared" if shared else "whole row a warp"
            RESULTS[f"int4norm {name} rep{rep}"] = engine_numbers(folder, "int4", (1,), note=f" [{name}]")
    cuda_int4.NORM["shared"] = default


def int4_head_tiles_ab(folder: Path) -> None:
    """After O7 (the RMSNorm split over a program's warps): the LM head and gate/up on other tiles, in turn
    against the step as it runs; bf16 once. The LM head at 4x8 on a ring of 4 is 2,004 programs (7.6 waves
    at two an SM, O6's Nsight: 66.6 us alone at 68% of DRAM peak). Ran once (O8, in a build ~50 us slower
    than O7's): every variant slower than the step as run."""

    w13, head = (16384, 2048), (128256, 2048)
    variants = {
        "as run": {},
        "head 2x16 ring 4": {head: (2, 16, 4)},
        "head 1x16 ring 4": {head: (1, 16, 4)},
        "head 4x8 ring 2": {head: (4, 8, 2)},
        "gate/up 2x16 ring 4": {w13: (2, 16, 4)},
    }
    _int4_tiles_in_turn(folder, "int4head", variants)


def int8_mixed_ab(folder: Path) -> None:
    """The int8 batch-1 step with one or two of a layer's products left in bf16 (`quant.KEEP_UNQUANTIZED`),
    bf16 and plain int8 in the same call: which products cost int8 its time beyond their bytes (the o
    product added 5.0-5.2 us a layer in int8 against 2.5 in bf16 for half the bytes, G8 / H4)."""
    from inferforge.llm import quant

    RESULTS["int8mixed bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for name, keep in (("all int8", set()), ("o bf16", {"o"}), ("qkv+o bf16", {"qkv", "o"}),
                       ("down bf16", {"down"}), ("all int8 again", set())):  # fmt: skip
        quant.KEEP_UNQUANTIZED.clear()
        quant.KEEP_UNQUANTIZED.update(keep)
        try:
            RESULTS[f"int8mixed {name}"] = engine_numbers(folder, "int8", (1,), note=f" [{name}]")
        finally:
            quant.KEEP_UNQUANTIZED.clear()


def o_bf16_ab(
    folder: Path, quants: tuple[str, ...] = ("int8", "fp8", "int4"), reps: tuple[int, ...] = (2, 1, 1)
) -> None:
    """Each quantized format's batch-1 step with the o product in bf16 and quantized, in turn (Q10: int8's
    o added more time than a bf16 o with twice its bytes)."""
    from inferforge.llm import quant

    RESULTS["obf16 bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    for fmt, n in zip(quants, reps, strict=True):
        for rep in range(n):
            for name, keep in (("all", set()), ("o bf16", {"o"})):
                quant.KEEP_UNQUANTIZED.clear()
                quant.KEEP_UNQUANTIZED.update(keep)
                try:
                    label = f"{fmt} {name} rep{rep}"
                    RESULTS[f"obf16 {label}"] = engine_numbers(folder, fmt, (1,), note=f" [{label}]")
                finally:
                    quant.KEEP_UNQUANTIZED.clear()


def int8_pre_ab(folder: Path, reps: int = 2, only: tuple[str, ...] = ()) -> None:
    """The int8 batch-1 step with the tiles of o, q/k/v and gate/up made fp16 before their wait
    (`gemv.INT8_PRE`) in growing sets, `reps` rounds in turn; bf16 once (Q12 measured o alone)."""
    from inferforge.llm import gemv

    RESULTS["int8pre bf16"] = engine_numbers(folder, None, (1,), note=" [bf16]")
    default = dict(gemv.INT8_PRE)
    sets = {"none": (), "o": ("o",), "o+qkv": ("o", "qkv"), "o+qkv+gate_up": ("o", "qkv", "gate_up")}
    if only:
        sets = {k: v for k, v in {**sets, "o+down": ("o", "down")}.items() if k in only}
    for rep in range(reps):
        for name, on in sets.items():
            gemv.INT8_PRE.update({p: p in on for p in gemv.INT8_PRE})
            RESULTS[f"int8pre {name} rep{rep}"] = engine_numbers(
                folder, "int8", (1,), note=f" [{name} rep{rep}]"
            )
    gemv.INT8_PRE.update(default)


def _prefetch_runs(folder: Path, runs: list[tuple[str | None, str, dict]]) -> None:
    """Each (format, label, `decode_gemv.L2_PREFETCH` entries) as its own engine's batch-1 step, in the
    order given; every product not named fetches nothing."""
    from inferforge.llm import decode_gemv

    default = dict(decode_gemv.L2_PREFETCH)
    try:
        for i, (fmt, name, plan) in enumerate(runs):
            decode_gemv.L2_PREFETCH.update({p: () for p in default} | plan)
            label = f"{fmt or 'bf16'} {name} #{i}"
            RESULTS[f"l2pf {label}"] = engine_numbers(folder, fmt, (1,), note=f" [{label}]")
    finally:
        decode_gemv.L2_PREFETCH.clear()
        decode_gemv.L2_PREFETCH.update(default)


def _o_fetches(fraction: float) -> dict:
    return {"o": (("gate_up", fraction),)} if fraction else {}


def l2_prefetch_ab(folder: Path, reps: int = 2) -> None:
    """The batch-1 step with later weights fetched into L2 by the products before them
    (`decode_gemv.L2_PREFETCH`), in turn: int8 `reps` rounds, bf16 once (its gate/up is 67 MB, more than the
    50 MB L2: fractions cap what one product asks for at ~27 MB). R2 of 2026-11-24."""

    def variants(fmt: str | None, gu: float, dn: float) -> list[tuple[str | None, str, dict]]:
        table = {
            "none": {},
            "o>gate_up": _o_fetches(gu),
            "qkv>gate_up": {"qkv": (("gate_up", gu),)},
            "o>gate_up gate_up>down": _o_fetches(gu) | {"gate_up": (("down", dn),)},
            "o>gate_up down>next_qkv": _o_fetches(gu) | {"down": (("next_qkv", 1.0),)},
        }
        return [(fmt, name, plan) for name, plan in table.items()]

    _prefetch_runs(folder, variants("int8", 1.0, 1.0) * reps + variants(None, 0.4, 0.8))


def l2_prefetch_small_ab(folder: Path, reps: int = 2) -> None:
    """int8 with o fetching the first 5-20% of gate/up into L2 (R2: the whole of it, 33.5 MB, cost 30-34 us
    a step; these fit the microseconds in which o and the attention leave DRAM idle). R3."""
    fracs = (0.0, 0.05, 0.1, 0.2)
    _prefetch_runs(folder, [("int8", f"o>gate_up {f}", _o_fetches(f)) for f in fracs] * reps)


def l2_prefetch_more_ab(folder: Path, reps: int = 2) -> None:
    """After R3 (o fetching 10% of gate/up: 613 us against 625): that with gate/up fetching 10% of down,
    with q/k/v fetching o; int8 `reps` rounds in turn, then bf16 with o fetching 0 / 5% / 10% of its (twice
    as large) gate/up. R4 (8d58293) also ran it with down's second K tile loaded before its wait, a knob
    since removed."""
    base = _o_fetches(0.1)
    runs = [
        ("int8", "o>gate_up 0.1", base),
        ("int8", "+ gate_up>down 0.1", base | {"gate_up": (("down", 0.1),)}),
        ("int8", "+ qkv>o", base | {"qkv": (("o", 1.0),)}),
    ] * reps
    _prefetch_runs(folder, runs + [(None, f"o>gate_up {f}", _o_fetches(f)) for f in (0, 0.05, 0.1)])


def int4_l2_prefetch_ab(folder: Path, reps: int = 2) -> None:
    """int4's batch-1 step with its o (Triton) fetching 0 / 10% / 20% of gate/up's words and scales into
    L2 before its wait (every int4 program reads from K = 0), `reps` rounds in turn. R6."""
    _prefetch_runs(folder, [("int4", f"o>gate_up {f}", _o_fetches(f)) for f in (0.0, 0.1, 0.2)] * reps)


def load_graph_buckets_ab(folder: Path, reps: int = 3) -> None:
    """The 64 x (128 + 128) load test (bf16, 8,192 tokens a step) with prompt-step graphs up to 2,048 tokens
    (the default: its 8,192-token prefill step runs eager) and with 4,096 and 8,192 added, `reps` rounds in
    turn (K4 of 2026-11-23: 35,327 against 34,818 tok/s in waves, one round, on a slow host). R9."""
    to_2048 = (128, 256, 384, 512, 768, 1024, 1536, 2048)
    for rep in range(reps):
        for name, buckets in (("to 2048", to_2048), ("+4096,8192", (*to_2048, 4096, 8192))):
            out = load_test(folder, None, 8192, prefill_graph_tokens=buckets)
            RESULTS[f"loadgraph {name} rep{rep}"] = out


def argmax_ab(folder: Path, reps: int = 2) -> None:
    """Greedy's argmax in one Triton launch (`sampler.ONE_LAUNCH_ARGMAX`, on) against the five torch
    launches, bf16 and int8, batch 1 by the engine loop (the graph is the same), `reps` rounds in turn."""
    from inferforge.llm import sampler

    try:
        for rep in range(reps):
            for quant in (None, "int8"):
                for on in (False, True):
                    sampler.ONE_LAUNCH_ARGMAX["on"] = on
                    name = f"argmax {quant or 'bf16'} {'one launch' if on else 'torch'} rep{rep}"
                    RESULTS[name] = engine_numbers(folder, quant, (1,), note=f" [{name}]")
    finally:
        sampler.ONE_LAUNCH_ARGMAX["on"] = True
