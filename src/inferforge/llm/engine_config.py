"""`EngineConfig`: everything that shapes one LLM engine, validated where it is built (the CLI, the server,
benchmarks fill it from their flags)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from inferforge.errors import InferforgeError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes one engine; the CLI and the server fill it from their flags."""

    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    quant: Literal["int8", "fp8", "int4"] | None = (
        None  # weight-only quantization of the linear layers (CUDA)
    )
    max_num_seqs: int = 64  # sequences decoding together
    max_model_len: int | None = None  # None: the model's own limit, capped at 4096
    max_waiting: int = 256  # queued requests before new ones are refused
    max_num_batched_tokens: int = 2048  # tokens per step (decodes + prefill chunks)
    kv_cache_tokens: int | None = None  # KV cache size in tokens; None: from free device memory
    kv_cache_memory_fraction: float = 0.9  # share of free device memory given to the KV cache
    cuda_graphs: bool = True  # capture decode steps per batch bucket on CUDA
    triton_attention: bool = True  # on CUDA, the Triton paged-decode kernel (if it matches the reference)
    fused_kernels: bool = True  # on CUDA, Triton kernels for norms+residual, RoPE+cache write, SiLU x up
    gemv_decode: bool = True  # on CUDA, batch-1 decode through `llm/gemv.py` (fused prologues)
    pdl: bool = True  # on Hopper+, programmatic dependent launch for the Triton kernels
    fp32_logits_mm: bool = True  # on CUDA, the LM head's GEMM writes fp32 logits itself
    # torch's GEMM library on CUDA (process-wide: `torch.backends.cuda.preferred_blas_library`); None leaves
    # it as it is. cuBLASLt picked faster batch-64 decode kernels on the H100 (G1: graph 1,598 / 1,587 us
    # against 1,620 / 1,621 with cuBLAS, in turn).
    gemm_library: Literal["cublas", "cublaslt"] | None = "cublaslt"
    compile_decode: bool = False  # on CUDA, torch.compile the decode block (measured slower so far: see docs)
    decode_buckets: tuple[int, ...] | None = None  # batch sizes to capture; None: 1, 2, 4, ... max_num_seqs
    mixed_steps: bool = (
        True  # decode rows and prompt chunks of one step in one eager pass (else graph + prefill)
    )
    # Token buckets of the CUDA graphs of prompt steps (on CUDA, with the varlen attention kernel once it
    # matched its reference), finer where a step is weight-bound and padding cheap; a step over the largest
    # bucket, or every step with (), runs eagerly. Only buckets up to the first that holds
    # `max_num_batched_tokens` are captured, so 4,096 and 8,192 cost nothing at the default 2,048 tokens a
    # step. With 8,192 a step, the 64 x (128 + 128) load test ran 35,292-35,409 tok/s with them against
    # 34,968-35,189 without, three rounds in turn (R9 of 2026-11-24, docs/llm-runs.md; K4 saw the same once).
    # Buckets over 2,048 take only steps whose chunks each end within 2,048 tokens (J5: long prompts gained
    # nothing from graphs) and that fill them to within 1/32 (`prefill_graphs.LARGE_BUCKET_PADDING`: those
    # steps are compute-bound, so padding costs what it computes).
    prefill_graph_tokens: tuple[int, ...] = (128, 256, 384, 512, 768, 1024, 1536, 2048, 4096, 8192)
    # Cut a prompt step that fits no graph bucket down to the largest bucket below it (the rest of its prompt
    # chunks wait a step) instead of running it eagerly (`PrefillGraphs.graph_tokens`); a chunk that ends past
    # 2,048 tokens (a long prompt) is never cut.
    align_prompt_steps: bool = True
    overlap_decode: bool = True  # launch the next decode step before reading this one back (see step())
    admit_delay_steps: int = 0  # hold arrivals up to this many steps while others decode (SchedulerConfig)
    enable_prefix_caching: bool = True  # reuse KV blocks of earlier prompts (and answers) with the same start
    # Reserve prompt + max_tokens of KV blocks per sequence at admission (nothing is ever preempted); off:
    # blocks as sequences grow, the newest request preempted and recomputed when they run out (scheduler.py).
    reserve_full_budget: bool = False
    experimental_quant: bool = False  # allow quant formats not (yet) measured faster than bf16 (benchmarks)
    # Speculative decoding by prompt lookup (`speculative.py`): drafts per sequence and step, 0 off; used
    # while at most `speculative_max_batch` greedy sequences decode.
    speculative_tokens: int = 0
    speculative_max_batch: int = 4
    # Once loaded, what is alive (the model, frameworks, the caller's objects) leaves the cyclic collector's
    # scans (`inferforge.heap.refreeze`, as vLLM's engine does): a full collection walks ~400k objects and
    # stalled a decode step ~0.1 s. Measured: the batch-1 bf16 loop ran 895-1,002 tok/s in later engines of
    # one process against 1,030-1,057 without the stalls (T7-T8 of 2026-11-24). Objects frozen then and
    # later dropped are freed by reference counting; only their reference cycles wait for the next engine's
    # (or the caller's) `refreeze`, which unfreezes and collects first.
    freeze_gc_heap: bool = True

    def __post_init__(self) -> None:
        if self.device.split(":")[0] not in ("cpu", "cuda"):
            raise InferforgeError(f"device must be cpu or cuda, got {self.device!r}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise InferforgeError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.quant not in (None, "int8", "fp8", "int4"):
            raise InferforgeError(f"quant must be int8, fp8, int4 or None, got {self.quant!r}")
        if self.gemm_library not in (None, "cublas", "cublaslt"):
            raise InferforgeError(f"gemm_library must be cublas, cublaslt or None, got {self.gemm_library!r}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise InferforgeError(
                f"kv_cache_memory_fraction must be in (0, 1], got {self.kv_cache_memory_fraction}"
            )
        if not 0 <= self.speculative_tokens <= 16 or self.speculative_max_batch < 1:
            raise InferforgeError(
                f"speculative_tokens must be in [0, 16] and speculative_max_batch >= 1, got "
                f"{self.speculative_tokens} and {self.speculative_max_batch}"
            )
        if self.device == "cpu" and self.kv_cache_tokens is None:
            object.__setattr__(self, "kv_cache_tokens", 8192)

    @property
    def torch_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if self.device == "cpu" else torch.bfloat16
        return DTYPES[self.dtype]
