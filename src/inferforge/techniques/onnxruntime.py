"""ONNX Runtime on the CPU: an exported graph run by ORT's CPU kernels, for edge boxes and CPU-only
deployments.

The export goes through `torch.onnx.export(dynamo=True)` with a dynamic batch (and sequence) dimension; the
ONNX file is kept so the artifact can ship it and the server can load it without re-exporting.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from inferforge.models.loaded import LoadedModel
from inferforge.techniques.base import ApplyContext, TechniqueConfig, register


class OrtModule(nn.Module):
    """Calls an ONNX Runtime session with torch tensors, returning a torch tensor."""

    def __init__(self, onnx_bytes: bytes, input_names: tuple[str, ...], threads: int = 0) -> None:
        super().__init__()
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(onnx_bytes, options, providers=["CPUExecutionProvider"])
        self.input_names = input_names
        self.onnx_size_bytes = len(onnx_bytes)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = {
            name: np.ascontiguousarray(t.detach().cpu().numpy())
            for name, t in zip(self.input_names, inputs, strict=True)
        }
        return torch.from_numpy(self.session.run(None, feed)[0])


def export_onnx(module: nn.Module, model: LoadedModel, example: tuple[torch.Tensor, ...]) -> bytes:
    batch = torch.export.Dim("batch", min=1, max=65536)
    seq = torch.export.Dim("seq", min=2, max=8192)
    dynamic = tuple({0: batch, **({1: seq} if spec.shape[1:2] == (-1,) else {})} for spec in model.inputs)
    program = torch.onnx.export(
        module,
        example,
        input_names=list(model.input_names),
        output_names=["inferforge_output"],
        dynamic_shapes=dynamic,
        dynamo=True,
        verbose=False,
    )
    buffer = io.BytesIO()
    program.save(buffer)
    return buffer.getvalue()


@register
@dataclass(frozen=True)
class OnnxRuntime(TechniqueConfig):
    """Export to ONNX and run with ONNX Runtime's CPU provider; `threads` 0 lets ORT choose."""

    name = "onnxruntime"
    kind = "graph"
    threads: int = 0

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        if ctx.is_cuda:
            return "only ONNX Runtime's CPU provider is supported: use it for CPU deployments"
        if ctx.compute_dtype != torch.float32:
            return "ONNX Runtime's CPU kernels are fp32: use it without bf16/fp16"
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return "onnxruntime is not installed (pip install 'inferforge[onnx]')"
        return None

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        model: LoadedModel = ctx.artifacts["loaded_model"]
        example = tuple(t[:2] for t in ctx.example_inputs)
        onnx_bytes = ctx.artifacts.get("model.onnx") or export_onnx(module.cpu(), model, example)
        ctx.artifacts["model.onnx"] = onnx_bytes
        ctx.notes.append(f"onnxruntime: {len(onnx_bytes) / 1e6:.1f} MB graph, CPU provider")
        return OrtModule(onnx_bytes, model.input_names, self.threads or (os.cpu_count() or 1))
