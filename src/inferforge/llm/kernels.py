"""Which kernels an engine runs on its device: each optional kernel is switched on only after it matched its
reference on the live device, so a kernel that misbehaves on some GPU costs speed, never correctness."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from inferforge.llm.engine_config import EngineConfig
from inferforge.llm.model import DecoderLM

logger = logging.getLogger(__name__)
# The tensor-core int4 GEMV for the wide products (`cuda_int4`): built with nvcc at engine start where the
# CUDA toolkit is installed, used only after it matched `gemv_int4` on the device. Benchmarks switch it off
# for their A/B runs (`bench_decode.py --sections int4tcab`).
INT4_TC = {"on": True}


@dataclass
class KernelChoice:
    decode_fn: Callable[..., torch.Tensor] | None  # paged decode attention (None: the torch reference)
    decode_kernel: str  # "triton" or "torch", for stats and benchmarks
    gemv_error: str | None  # why the batch-1 GEMVs were refused on this model, if they were
    varlen_fn: Callable[..., torch.Tensor] | None = None  # varlen paged attention (prompt-step graphs)


def choose_kernels(model: DecoderLM, config: EngineConfig, device: torch.device) -> KernelChoice:
    """The GEMM library, paged decode attention, the fused norm/RoPE/SiLU kernels, programmatic dependent
    launch (Hopper), the batch-1 GEMVs (checked against each decode layer's own forward on the real
    weights), the fp32-logits LM head, and the compiled decode block if asked for; the model is set up in
    place."""
    decode_fn = varlen_fn = None
    if device.type == "cuda" and config.gemm_library is not None:
        torch.backends.cuda.preferred_blas_library(config.gemm_library)
    if device.type == "cuda" and config.triton_attention and config.torch_dtype != torch.float32:
        from inferforge.llm import triton_attn

        decode_fn = triton_attn.verified_kernel(device)
        d = model.cfg.head_dim
        if config.cuda_graphs and config.prefill_graph_tokens and d >= 16 and d & (d - 1) == 0:
            from inferforge.llm import triton_varlen_attn

            varlen_fn = triton_varlen_attn.verified_kernel(device)
    gemv_error = None
    if device.type == "cuda" and config.fused_kernels and model.can_fuse():
        from inferforge.llm import fused

        fused.enable_pdl(config.pdl and torch.cuda.get_device_capability(device) >= (9, 0))
        if fused.verified(device, config.torch_dtype):
            model.fused_ops = fused
        if model.fused_ops is not None and config.gemv_decode and model.gemv_ready():
            gemv_error = _enable_gemv(model, config, device)
    if device.type == "cuda" and config.fp32_logits_mm:
        model.enable_fp32_logits_mm()
    if device.type == "cuda" and config.compile_decode:
        model.compile_decode()
    return KernelChoice(decode_fn, "torch" if decode_fn is None else "triton", gemv_error, varlen_fn)


def _enable_gemv(model: DecoderLM, config: EngineConfig, device: torch.device) -> str | None:
    from inferforge.llm import decode_gemv, gemv_check

    if not gemv_check.verified(device, config.torch_dtype):
        return "gemv did not match its reference on this device"
    layer = model.blocks()[0]
    if any(getattr(m, "W_nbits", None) == 4 for m in model.modules()):
        from inferforge.llm import cuda_int4

        # Before the layer check below, so that it also reads the real weights through this kernel.
        why = cuda_int4.enable(device, config.torch_dtype) if INT4_TC["on"] else cuda_int4.disable()
        if why is not None:
            logger.warning("tensor-core int4 GEMV not used, the Triton one is: %s", why)
    try:
        gemv_check.matches_layers([layer.attn.qkv, layer.attn.o, layer.mlp.up, layer.mlp.down, model.lm_head],
                            config.torch_dtype)  # fmt: skip
    except RuntimeError as exc:  # keep the layers' own kernels; say why
        return str(exc)
    model.gemv_ops = decode_gemv
    return None
