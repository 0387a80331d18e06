"""Experiment (runs P1-P5, 2026-11-24, docs/persistent.md): the whole batch-1 int4 decode step as one
persistent CUDA kernel (`int4_step.cu`), for Llama-shaped models whose every product is int4 in gemlite's
layout. Correct (logits within bf16 rounding of the engine's chain, argmax equal) but slower than the chain
it would replace: 776-789 against 485-492 us a step at a 144-token context on the H100 (P5), so the engine
does not use it and it lives here, not in the package.

Why it was tried: the chain (`cuda_int4` and Triton, 5 kernels a layer) pays ~3-4 us at each kernel boundary
beyond its bytes, ~80 boundaries a step, and int4 moves only ~0.7 GB a token (runs O1-O12). One launch with
grid barriers between the phases, each warp streaming its weights through a ring that runs on across the
barriers, removes the boundaries while keeping the weight stream going. What it showed: a phase here costs
about what a kernel boundary costs there (barrier ~1.1 us, then the activation row from L2, the norm, the
block-wide reductions), and each warp needs ~0.75 us a 1 KB unit of weights (Nsight: 263 M warp
instructions a step at 0.35 issued a cycle a scheduler, stalls mostly block barriers and dependencies).

`Int4Step.logits` has `DecoderLM.decode_logits`'s contract for one sequence; `reasons` says why a model does
not fit; `check_against_chain` compares both ways from the same cache.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from inferforge.llm import cuda_int4
from inferforge.llm.attention import AttnMeta
from inferforge.llm.gemv_int4 import Int4Weight, int4_weight

HERE = Path(__file__).parent
SOURCES = (HERE / "int4_step.cu", HERE.parents[1] / "src" / "inferforge" / "llm" / "csrc" / "int4_gemv_tc.cu")
KIND = {"qkv": 0, "attn": 1, "o": 2, "gateup": 3, "down": 4, "head": 5}
WARPS, MAX_SPLITS, HEAD_DIM, GROUP_HEADS, TRACE_UNITS = 16, 32, 64, 4, 2048
_LIB: dict[tuple, ctypes.CDLL] = {}


class StepError(RuntimeError):
    """The kernel cannot run this model here (build, shape or launch): the engine keeps the chain."""


def library_path() -> Path:
    return cuda_int4.library_path("int4_step", SOURCES)


def build(path: Path | None = None) -> Path:
    """Compile for this GPU (~90 s of one core for sm_90) unless the cache has it."""
    try:
        return cuda_int4.build(path or library_path(), SOURCES[0], "the int4 step kernel")
    except cuda_int4.BuildError as exc:
        raise StepError(str(exc)) from exc


def library() -> ctypes.CDLL:
    """The loaded library (`INFERFORGE_INT4_STEP_LIB` names a prebuilt one)."""
    override = os.environ.get("INFERFORGE_INT4_STEP_LIB")
    key = (override, torch.cuda.get_device_capability())
    if key not in _LIB:
        lib = ctypes.CDLL(str(Path(override) if override else build()))
        p, i = ctypes.c_void_p, ctypes.c_int
        lib.if_int4_step.restype = ctypes.c_int
        lib.if_int4_step.argtypes = [p, i, *[p] * 10, i, i, i, i, ctypes.c_longlong, i, i, i,
                                     ctypes.c_float, ctypes.c_float, p]  # fmt: skip
        _LIB[key] = lib
    return _LIB[key]


def _layers(model) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for b in model.blocks():
        out += [("qkv", b.attn.qkv), ("o", b.attn.o), ("gateup", b.mlp.up), ("down", b.mlp.down)]
    return [*out, ("head", model.lm_head)]


def _rows_per_tile(kind: str) -> int:
    return 64 if kind in ("gateup", "head") else 16


def reasons(model) -> list[str]:
    """Why the kernel cannot run this model ([] if it can): Llama-shaped (RMSNorm, RoPE, gated SiLU, no
    biases, heads of 64, 4 q heads a KV head), every product int4 in gemlite's layout with one fma mode,
    K from 2,048 to 8,192 in whole 1 KB units a warp (a multiple of 512 for 64-row tiles, of 2,048 for
    16-row ones), each warp's K range 1, 2, 4 or 8 groups, and a warp's scales of a tile (groups x rows /
    16) at most 8 (its 512-byte slot)."""
    cfg = model.cfg
    why = []
    if not model.can_fuse():
        why.append("not RMSNorm + RoPE + gated SiLU")
    if cfg.head_dim != HEAD_DIM or cfg.num_heads != GROUP_HEADS * cfg.num_kv_heads:
        why.append(f"needs heads of {HEAD_DIM} and {GROUP_HEADS} q heads a KV head")
    modes = set()
    for kind, m in _layers(model):
        w = int4_weight(m)
        if w is None or getattr(m, "bias", None) is not None:
            why.append(f"{kind}: not an int4 layer without bias in gemlite's layout")
            break
        n, k = w.shape
        modes.add((w.fma, w.group, w.scales.dtype))
        per_warp_groups = k // WARPS // w.group if k % (WARPS * w.group) == 0 else 0
        mt = _rows_per_tile(kind) // 16
        if (
            k % (2048 // mt)  # 16-row tiles: whole 1 KB units of 4 quads a warp
            or not 2048 <= k <= 8192
            or per_warp_groups not in (1, 2, 4, 8)
            or per_warp_groups * mt > 8
        ):
            why.append(f"{kind}: K={k}, group {w.group} do not fit the kernel's warps and scale slots")
            break
        if n % _rows_per_tile(kind):
            why.append(f"{kind}: N={n}, K={k}, group {w.group} do not fit the kernel's tiles")
            break
    if len(modes) > 1:
        why.append("layers differ in fma mode, group or scale dtype")
    return why


class Int4Step:
    """One decode step of one sequence in one launch (plus the embedding gather). Holds the phase table
    (pointers into the model's own tensors, so the model must outlive it) and the step's scratch."""

    def __init__(self, model, trace: bool = False) -> None:
        why = reasons(model)
        if why:
            raise StepError("; ".join(why))
        cfg, dev = model.cfg, model.embed.weight.device
        self.model, self.dtype = model, model.embed.weight.dtype
        self.heads, self.kv_heads = cfg.num_heads, cfg.num_kv_heads
        hidden, d = cfg.hidden_size, cfg.head_dim
        ffn = cfg.intermediate_size
        self.x = torch.empty(1, hidden, device=dev, dtype=self.dtype)  # the residual stream
        self.q = torch.empty(self.heads * d, device=dev, dtype=self.dtype)
        self.h = torch.empty(ffn, device=dev, dtype=self.dtype)
        self.out = torch.empty(1, self._vocab(model), device=dev, dtype=torch.float32)
        self.part = torch.empty(self.kv_heads * MAX_SPLITS * GROUP_HEADS * (d + 4), device=dev)
        self.bar = torch.zeros(2, device=dev, dtype=torch.int32)
        self.error = torch.zeros(1, device=dev, dtype=torch.int32)
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        # per program and phase, globaltimer (ns) at the phase's start (after its barrier) and end; then when
        # program 0's first warp had each of its units
        size = sms * (5 * len(model.blocks()) + 1) * 2 + TRACE_UNITS
        self.trace = torch.zeros(size, device=dev, dtype=torch.int64) if trace else None
        first = int4_weight(model.lm_head)
        assert first is not None
        self.group, self.fma = first.group, first.fma
        self.phases = torch.tensor(self._table(model), dtype=torch.int64, device=dev)

    @staticmethod
    def _vocab(model) -> int:
        head = int4_weight(model.lm_head)
        assert head is not None
        return head.shape[0]

    def _row(
        self, kind: str, w: Int4Weight | None, x: torch.Tensor | None, norm: torch.Tensor | None,
        y: torch.Tensor | None,
        kc: torch.Tensor | None = None, vc: torch.Tensor | None = None,
    ) -> list[int]:  # fmt: skip
        n, k = w.shape if w is not None else (0, 0)
        ptrs = (w.packed, w.scales, w.zeros) if w is not None else (None, None, None)
        ptrs += (x, norm, y, kc, vc)
        return [KIND[kind], n, k, *(0 if t is None else t.data_ptr() for t in ptrs), 0]

    def _table(self, model) -> list[list[int]]:
        rows = []
        for b in model.blocks():
            a, m = b.attn, b.mlp
            kc, vc = a.k_cache, a.v_cache
            rows.append(self._row("qkv", int4_weight(a.qkv), self.x, b.norm1.weight, self.q, kc, vc))
            rows.append(self._row("attn", None, self.q, None, None, kc, vc))
            rows.append(self._row("o", int4_weight(a.o), None, None, self.x))
            rows.append(self._row("gateup", int4_weight(m.up), self.x, b.norm2.weight, self.h))
            rows.append(self._row("down", int4_weight(m.down), self.h, None, self.x))
        rows.append(self._row("head", int4_weight(model.lm_head), self.x, model.norm.weight, self.out))
        return rows

    def logits(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """fp32 logits [1, vocab] of one decode step (a buffer this object reuses); the step's key and value
        go into the cache at `meta.slot_mapping`, as the chain writes them."""
        assert meta.block_tables is not None and meta.context_lens is not None
        idx = (positions, meta.slot_mapping, meta.context_lens, meta.block_tables)
        if input_ids.shape != (1,) or any(t.dtype != torch.int64 or not t.is_contiguous() for t in idx):
            raise ValueError("one sequence, with int64 positions, slots, context lengths and block table")
        torch.index_select(self.model.embed.weight, 0, input_ids, out=self.x)
        kc = self.model.blocks()[0].attn.k_cache
        code = library().if_int4_step(
            self.phases.data_ptr(), self.phases.shape[0], positions.data_ptr(), meta.slot_mapping.data_ptr(),
            meta.context_lens.data_ptr(), meta.block_tables.data_ptr(), self.model.rope_cos.data_ptr(),
            self.model.rope_sin.data_ptr(), self.part.data_ptr(),
            self.bar.data_ptr(), self.error.data_ptr(), 0 if self.trace is None else self.trace.data_ptr(),
            self.heads, self.kv_heads, kc.shape[-1], kc.shape[1],
            self.kv_heads * kc.shape[-1], self.group, int(self.fma), int(self.dtype == torch.float16),
            self.model.cfg.norm_eps, kc.shape[-1] ** -0.5, torch.cuda.current_stream(kc.device).cuda_stream,
        )  # fmt: skip
        if code != 0:
            raise StepError(f"int4 step kernel refused to launch: code {code}")
        return self.out

    def healthy(self) -> bool:
        """No barrier timed out and the counters are back at zero (syncs: for checks, not the hot path)."""
        return int(self.error.item()) == 0 and int(self.bar.abs().sum()) == 0


def check_against_chain(model, step: Int4Step, decode_fn, contexts: tuple[int, ...] = (1, 40, 300)) -> float:
    """Largest difference between the step kernel's logits and the chain's (`model.decode_logits`), relative
    to the chain's largest, over one step at each context length, from the same cache and inputs. Overwrites
    the first cache blocks of every layer with random keys and values: for engine start and tests only.
    Raises StepError if a barrier timed out."""
    dev = step.x.device
    cache = model.blocks()[0].attn.k_cache
    blocks = -(-max(contexts) // cache.shape[1])
    if blocks > cache.shape[0]:
        raise ValueError(
            f"contexts up to {max(contexts)} need {blocks} cache blocks, the cache has {cache.shape[0]}"
        )
    gen = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    with torch.inference_mode():
        for b in model.blocks():
            for c in (b.attn.k_cache, b.attn.v_cache):
                c[:blocks].copy_(torch.randn(c[:blocks].shape, generator=gen, device=dev).to(c.dtype))
        table = torch.arange(blocks, device=dev, dtype=torch.int64).view(1, blocks)
        for ctx in contexts:
            pos = torch.tensor([ctx - 1], device=dev)
            meta = AttnMeta(
                slot_mapping=pos.clone(), block_tables=table, context_lens=torch.tensor([ctx], device=dev),
                decode_fn=decode_fn,
            )  # fmt: skip
            ids = torch.randint(0, step.out.shape[1], (1,), generator=gen, device=dev)
            want = model.decode_logits(ids, pos, meta).float()
            got = step.logits(ids, pos, meta)
            if not step.healthy():
                raise StepError("a grid barrier timed out")
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1e-12)).item())
    return worst
