"""`LoadedModel`: what every later stage gets from `models`, whatever the source was."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from inferforge.models.tasks import Task
from inferforge.signature import TensorSpec


@dataclass
class LoadedModel:
    """An fp32 module on the CPU, called with positional tensors in `inputs` order, returning one tensor.

    `rebuild` says how to construct the same architecture again (a registry artifact stores it with the
    weights): {"kind": "factory", "factory": "pkg.mod:fn"} | {"kind": "hf", "task": ...} | {"kind": "builtin",
    "name": ...}.
    """

    module: nn.Module
    task: Task
    inputs: tuple[TensorSpec, ...]  # may be empty until data tells the shapes (factories, .pt2)
    output: TensorSpec
    source: str
    source_sha256: str
    rebuild: dict[str, Any]
    hf_dir: Path | None = None  # config.json and tokenizer files to copy into an artifact
    tokenizer: Any = None
    default_data: str | None = None
    max_seq_len: int = 128
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.inputs)
