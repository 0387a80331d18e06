"""Weight-only quantized linears for decode, through gemlite's Triton kernels (CUDA only).

Batch-1 decode is bound by reading weights, so fewer bytes per weight is speed: int8 and fp8 (per output
channel) halve them, int4 (groups of 64, asymmetric, min-max) quarters them. torchao's eager weight-only paths
are slower than bf16 at batch 1 on this project's H100 (docs/llm-engine.md); gemlite's layers hold the
weights and serve every batch size above 1, and at batch 1 `gemv.py` / `gemv_int4.py` read the same bytes
(faster than gemlite's own batch-1 kernels). A format is offered (`OFFERED`) only once measured faster than
bf16 end to end at batch 1 through the engine: on the H100 (2026-11-23, 1.2B Llama shape, bf16 itself at
1,039 tok/s, G11) int8 1.35x, fp8 1.46x, int4 1.26x (graph); since then int8 1.46-1.49x (H8, L1, L4),
1.50-1.54x with o's tile made fp16 before its wait (Q12-Q15 of 2026-11-24), and
int4 1.35x on the Triton GEMV (L4, L5), 1.56-1.58x with the tensor-core one for its wide products (M4, M6:
graph 602-613 us against 953-956) and 1.78-1.83x with it on rings for gate/up, down and the LM head (N5-N8:
519-538 us against 952-959). At batch 64 (G14, engine loop, same run as bf16) fp8 runs at 1.06x bf16
and int8 at 0.95x, with the narrow products on gemlite's split-K kernel (`SPLITK_NARROW`), int4 at 0.78x
(G15): int4 is for latency-bound serving and smaller memory.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from torch import nn

from inferforge.errors import NotApplicable
from inferforge.llm.model import DecoderLM

OFFERED = ("int8", "fp8", "int4")
IMPLEMENTED = ("int8", "fp8", "int4")
INT4_GROUP = 64
# The int4 recipe as the engine applies it: weights per group, and the LM head's format in an int4 model
# ("int4", or "int8": the head is a fifth of the int4 bytes, and Nsight read its int4 GEMV at 43% of DRAM
# peak where int8's reads at 89%, L2 / K1 of 2026-11-23). Benchmarks change these for their A/B runs
# (`bench_decode.py --sections int4recipeab`, `train_small_llama.py --formats int4-g128,int4-head8`); the
# defaults are the measured recipe (D4: int4 +0.253 held-out perplexity on the project's own model; M2:
# groups of 128 slower in the step, 724 against 710 us).
# "method": how each group's zero point is chosen: "rtn" (min-max, the zero at the minimum) or "hqq" (the
# zero that half-quadratic optimization finds for the min-max scale, `_hqq_zero`). HQQ lowers the weights'
# error (CPU test), but on the project's own model its held-out perplexity was no better: 19.483 against
# 19.460 for min-max, bf16 19.258 (Q4 of 2026-11-24, one trained model, same call), so min-max stays.
INT4_RECIPE: dict = {"group": INT4_GROUP, "lm_head": "int4", "method": "rtn"}
# Half-quadratic quantization's defaults for the zero point (HQQ, Badri and Shaji 2023, as the hqq library
# sets them for its 4-bit groups): an l_p error with p < 1, so a few large errors (outliers) may stay while
# the rest shrink.
HQQ = {"lp_norm": 0.7, "beta": 10.0, "kappa": 1.01, "iters": 20}


def _hqq_zero(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The zero point per group that minimises the l_p (p < 1) error of W ~ (W_q - zero) * scale with the
    scale fixed: alternate W_q (rounding), the sparse error (a generalised soft threshold) and the zero (a
    mean, closed form). Data-free and a few elementwise passes, so it runs at engine start. Returns the
    best zero seen (mean absolute error), which is never worse than the min-max one it starts from."""
    p, beta, kappa = HQQ["lp_norm"], HQQ["beta"], HQQ["kappa"]
    inv = 1.0 / scale
    best, best_err = zero, float("inf")
    for _ in range(int(HQQ["iters"])):
        w_q = (w * inv + zero).round_().clamp_(0, 15)
        err = w - (w_q - zero) * scale
        mean_err = float(err.abs().mean())
        if mean_err >= best_err:
            break
        best, best_err = zero, mean_err
        shrunk = torch.sign(err) * torch.relu(err.abs() - err.abs().pow(p - 1) / beta)
        zero = (w_q - (w - shrunk) * inv).mean(-1, keepdim=True)
        beta *= kappa
    return best


def _int4_pack(
    weight: torch.Tensor, group: int, method: str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group: W ~ (W_q - zero) * scale, W_q in [0, 15], the scale from the group's range and
    the zero (a float, as gemlite stores it) from `INT4_RECIPE["method"]`."""
    out_f, in_f = weight.shape
    w = weight.float().view(out_f, in_f // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / 15).clamp(min=1e-8)
    zero = -lo / scale
    method = method or INT4_RECIPE["method"]
    if method == "hqq":
        zero = _hqq_zero(w, scale, zero)
    elif method != "rtn":
        raise ValueError(f"int4 method must be hqq or rtn, got {method!r}")
    w_q = (w / scale + zero).round().clamp(0, 15).to(torch.uint8).view(out_f, in_f)
    return w_q, scale.view(out_f, -1), zero.view(out_f, -1)


# From 64 rows gemlite runs its "GEMM" kernel, below it "GEMM_SPLITK". At 64 rows on the H100 (G13, us a
# call, int8 / fp8) GEMM ran the narrow products 1.2-2.2x slower than GEMM_SPLITK: o 19.0 / 14.5 against
# 8.5 / 7.7, down 39.0 / 30.6 against 20.2 / 17.7, q/k/v 11.9 / 10.2 against 9.9 / 10.0. On the wide ones
# GEMM was faster: gate/up 26.7 / 20.6 against 32.0 / 25.1, LM head 156 / 145 against 216 / 175. So 8-bit
# layers with at most `max_n` outputs take GEMM_SPLITK up to `max_rows` rows. In the engine at batch 64
# (G14, graphs, in turn): int8 2,217 / 2,221 -> 1,707 / 1,704 us, fp8 1,883 / 1,892 -> 1,539 / 1,538 us
# (bf16 1,619 in the same run); int4 (G15) 2,542 / 2,541 -> 2,056 / 2,066 us (bf16 1,624).
SPLITK_NARROW: dict = {"on": True, "max_rows": 64, "max_n": 8192, "formats": ("int8", "fp8", "int4")}


def _split_k_when_narrow(layer: nn.Module, fmt: str = "int8") -> nn.Module:
    """Route this layer's calls of up to `max_rows` rows to gemlite's split-K kernel when it is narrow and
    its format is listed (`SPLITK_NARROW`); other calls keep gemlite's own choice."""
    cfg = SPLITK_NARROW
    if not cfg["on"] or fmt not in cfg["formats"] or getattr(layer, "out_features", 1 << 30) > cfg["max_n"]:
        return layer
    auto, max_rows = layer.forward, cfg["max_rows"]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2 and 4 < x.shape[0] <= max_rows:  # gemlite's own GEMV choice up to 2 (8-bit), 4 (int4)
            return layer.forward_manual(x, "GEMM_SPLITK")  # type: ignore[operator]
        return auto(x)

    layer.forward = forward  # an instance attribute: nn.Module.__call__ looks it up on the instance first
    return layer


def quantize_linear(linear: nn.Module, fmt: str) -> nn.Module:
    assert isinstance(linear, nn.Linear), f"expected nn.Linear, got {type(linear).__name__}"
    from gemlite import helper

    device, dtype = linear.weight.device, linear.weight.dtype
    if fmt == "int8":
        layer = helper.A16W8_INT8(device=device, dtype=dtype).from_linear(linear, del_orig=False)
    elif fmt == "fp8":
        layer = helper.A16W8_FP8(device=device, dtype=dtype).from_linear(linear, del_orig=False)
    else:
        group = INT4_RECIPE["group"]
        w_q, scale, zero = _int4_pack(linear.weight.data, group)
        bias = linear.bias.data if linear.bias is not None else None
        layer = helper.A16Wn(device=device, dtype=dtype).from_weights(
            w_q, scale.to(dtype), zero.to(dtype), W_nbits=4, group_size=group, bias=bias
        )
    return _split_k_when_narrow(layer, fmt)


# Projections left in the model's own dtype ("qkv", "o", "up", "down"): empty in every engine; benchmarks set
# it to time one product of a quantized step in bf16 beside the others (`bench_decode.py --sections
# int8mixedab`).
KEEP_UNQUANTIZED: set[str] = set()


def quantize_model(model: DecoderLM, fmt: str, *, lm_head: bool = True, experimental: bool = False) -> None:
    """Swap every block's q/k/v, o, gate/up and down projections (and the LM head) for quantized ones."""
    allowed = IMPLEMENTED if experimental else OFFERED
    if fmt not in allowed:
        raise NotApplicable(
            f"quant {fmt!r} is not offered: only formats measured faster than bf16 end to end are "
            f"({', '.join(OFFERED)}); see docs/llm-engine.md"
        )
    if model.embed.weight.device.type != "cuda":
        raise NotApplicable(
            f"--quant {fmt} needs a CUDA device (gemlite kernels); use --device cuda or no quant"
        )
    if fmt == "fp8" and torch.cuda.get_device_capability(model.embed.weight.device) < (8, 9):
        raise NotApplicable("--quant fp8 needs a GPU with fp8 support (compute capability 8.9+: Ada, Hopper)")
    keep = KEEP_UNQUANTIZED
    for layer in model.blocks():
        if "qkv" not in keep:
            layer.attn.qkv = quantize_linear(layer.attn.qkv, fmt)
        if "o" not in keep:
            layer.attn.o = quantize_linear(layer.attn.o, fmt)
        if "up" not in keep:
            layer.mlp.up = quantize_linear(layer.mlp.up, fmt)
        if "down" not in keep:
            layer.mlp.down = quantize_linear(layer.mlp.down, fmt)
    if lm_head:
        weight = model.lm_head.weight
        assert isinstance(weight, torch.Tensor)
        head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        head.weight = nn.Parameter(weight.data, requires_grad=False)  # quantizing makes a copy when tied
        model.lm_head = quantize_linear(head, INT4_RECIPE["lm_head"] if fmt == "int4" else fmt)
    torch.cuda.empty_cache()


def tuned_config_path(device: torch.device) -> Path:
    """Where gemlite's autotuned kernel configurations for this GPU are kept (JSON, `INFERFORGE_CACHE` or
    ~/.cache/inferforge): gemlite autotunes every new shape on first use, which made a quantized engine take
    60-90 s to start on the H100."""
    import gemlite

    root = os.environ.get("INFERFORGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "inferforge")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device)).strip("-")
    version = re.sub(r"[^A-Za-z0-9.]+", "-", getattr(gemlite, "__version__", "unknown"))
    return Path(root) / f"gemlite-{gpu}-{version}-triton{_triton_version()}.json"


def _triton_version() -> str:
    import triton

    return str(triton.__version__)


def load_tuned_configs(device: torch.device) -> bool:
    """Reuse the configurations an earlier engine tuned on this kind of GPU (a JSON file gemlite reads)."""
    import gemlite

    path = tuned_config_path(device)
    return path.is_file() and bool(gemlite.load_config(str(path), print_error=False))


def save_tuned_configs(device: torch.device) -> Path | None:
    """Write the configurations tuned so far (merged with the file's); a failure to write only costs the
    next start its tuning time, so it is reported, not raised."""
    import gemlite

    path = tuned_config_path(device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        gemlite.cache_config(str(path))
    except OSError:
        return None
    return path
