"""Bytes a variant stores and the device memory it peaks at."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def _leaf_tensors(tensor: torch.Tensor) -> Iterator[torch.Tensor]:
    """Plain tensors inside a tensor subclass (torchao's quantized tensors keep packed data and scales
    inside)."""
    flatten = getattr(tensor, "__tensor_flatten__", None)
    if flatten is None or type(tensor) in (torch.Tensor, nn.Parameter):
        yield tensor
        return
    names, _ = flatten()
    for name in names:
        yield from _leaf_tensors(getattr(tensor, name))


def model_size_bytes(module: object) -> int:
    """Stored bytes of weights and buffers, counting quantized tensors at their packed size."""
    onnx_bytes = getattr(module, "onnx_size_bytes", None)
    if onnx_bytes:
        return int(onnx_bytes)
    if not isinstance(module, nn.Module):
        return 0
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        for leaf in _leaf_tensors(tensor.data if isinstance(tensor, nn.Parameter) else tensor):
            key = leaf.untyped_storage().data_ptr() if leaf.device.type != "meta" else id(leaf)
            if key not in seen:
                seen.add(key)
                total += leaf.numel() * leaf.element_size()
    return total


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_bytes(device: torch.device) -> int | None:
    """Peak bytes allocated by PyTorch on the device since the last reset; None on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    return None


def power_watts(device: torch.device) -> float | None:
    """The board's power draw right now, where NVML can be read through PyTorch."""
    if device.type != "cuda":
        return None
    try:
        return torch.cuda.power_draw(device) / 1000.0
    except Exception:  # NVML missing or not permitted: energy is then not reported
        return None
