"""The technique protocol, its registry, recipes and variants.

A technique is one frozen config dataclass in its own module: `applies_to` says why it cannot run here (or
None), `apply` returns the changed module. Registering the class by name is all it takes to add one. A recipe
is an ordered tuple of configs; `apply_recipe` turns a loaded model into a `Variant` that later stages call
and time.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from inferforge.errors import NotApplicable, TechniqueError
from inferforge.models.loaded import LoadedModel

# Order in which kinds apply: change the numbers, then the layout, then quantize, then hand the graph to a
# compiler.
KIND_ORDER = {"precision": 0, "layout": 1, "quantization": 2, "graph": 3}


@dataclass
class ApplyContext:
    """What techniques need to know and may change while a recipe is applied."""

    device: torch.device
    example_inputs: tuple[torch.Tensor, ...]
    compute_dtype: torch.dtype = torch.float32
    channels_last_inputs: bool = False
    tf32: bool = False
    skip_modules: frozenset[str] = frozenset()  # layers to keep in higher precision (sensitivity fallback)
    compile_s: float = 0.0
    notes: list[str] = field(default_factory=list)
    artifacts: dict[str, Any] = field(default_factory=dict)  # e.g. an ONNX file to save beside the weights

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    def cast_inputs(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        out = []
        for tensor in inputs:
            tensor = tensor.to(self.device, non_blocking=True)
            if tensor.is_floating_point():
                tensor = tensor.to(self.compute_dtype)
                if self.channels_last_inputs and tensor.dim() == 4:
                    tensor = tensor.contiguous(memory_format=torch.channels_last)
            out.append(tensor)
        return tuple(out)


@dataclass(frozen=True)
class TechniqueConfig:
    """Base of every technique's config. Subclasses set `name` and `kind` and implement the two methods."""

    name: ClassVar[str]
    kind: ClassVar[str]
    version: ClassVar[int] = 1

    def applies_to(self, model: LoadedModel, ctx: ApplyContext) -> str | None:
        """None if the technique can run here, else the reason it cannot (shown to the user)."""
        return None

    def apply(self, module: nn.Module, ctx: ApplyContext) -> nn.Module:
        raise NotImplementedError

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, **dataclasses.asdict(self)}

    @property
    def label(self) -> str:
        params = [
            f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default
        ]
        return self.name + (f"({','.join(params)})" if params else "")


REGISTRY: dict[str, type[TechniqueConfig]] = {}


def register(cls: type[TechniqueConfig]) -> type[TechniqueConfig]:
    if cls.kind not in KIND_ORDER:
        raise TypeError(f"{cls.__name__}: kind {cls.kind!r} is not one of {sorted(KIND_ORDER)}")
    REGISTRY[cls.name] = cls
    return cls


_BUILTINS_LOADED = False


def _load_all() -> None:
    """Import every technique module so each registers itself; cheap, torchao loads only when applied.

    A flag, not "is the registry empty": a user's technique registered first must not hide the built-in ones.
    """
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    import importlib
    import pkgutil

    import inferforge.techniques as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "base":
            importlib.import_module(f"inferforge.techniques.{info.name}")


def technique_names() -> list[str]:
    _load_all()
    return sorted(REGISTRY)


def parse_technique(spec: str | dict[str, Any]) -> TechniqueConfig:
    """`"int8_weight"`, `"compile:mode=reduce-overhead"` or a JSON dict from a manifest."""
    _load_all()
    if isinstance(spec, dict):
        name, params = spec["name"], {k: v for k, v in spec.items() if k not in ("name", "version")}
    else:
        name, _, rest = spec.partition(":")
        params = dict(p.split("=", 1) for p in rest.split(",") if p) if rest else {}
    if name not in REGISTRY:
        raise TechniqueError(f"unknown technique {name!r}; known: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = set(params) - set(types)
    if unknown:
        raise TechniqueError(
            f"technique {name!r} has no parameter(s) {sorted(unknown)}; it has {sorted(types)}"
        )
    try:
        converted = {k: _convert(v, types[k]) for k, v in params.items()}
        return cls(**converted)
    except (TypeError, ValueError) as exc:
        raise TechniqueError(f"technique {spec!r}: {exc}") from exc


def _convert(value: Any, annotation: Any) -> Any:
    if not isinstance(value, str):
        return value
    text = str(annotation)
    if "bool" in text:
        return value.lower() in ("1", "true", "yes")
    if ("int" in text and "None" not in text) or text == "int":
        return int(value)
    if "float" in text:
        return float(value)
    return value


@dataclass(frozen=True)
class Recipe:
    """An ordered set of techniques, at most one of each kind."""

    steps: tuple[TechniqueConfig, ...]

    def __post_init__(self) -> None:
        kinds = [s.kind for s in self.steps]
        if len(set(kinds)) != len(kinds):
            raise TechniqueError(f"recipe {self.label!r} has two techniques of one kind: {kinds}")
        ordered = tuple(sorted(self.steps, key=lambda s: KIND_ORDER[s.kind]))
        object.__setattr__(self, "steps", ordered)

    @classmethod
    def parse(cls, text: str) -> Recipe:
        """`"bf16+int8_weight+compile"`."""
        return cls(tuple(parse_technique(part) for part in text.split("+") if part))

    @property
    def label(self) -> str:
        return "+".join(s.label for s in self.steps) or "fp32"

    def has(self, kind: str) -> bool:
        return any(s.kind == kind for s in self.steps)

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.steps]

    @classmethod
    def from_json(cls, data: list[dict[str, Any]]) -> Recipe:
        return cls(tuple(parse_technique(d) for d in data))


@dataclass
class Variant:
    """A model transformed by a recipe and placed on a device: call it with the data's tensors."""

    module: Callable[..., torch.Tensor]
    recipe: Recipe
    context: ApplyContext

    @property
    def device(self) -> torch.device:
        return self.context.device

    def prepare(self, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return self.context.cast_inputs(inputs)

    def forward_prepared(self, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """Run on inputs already on the device in the right dtype: what the benchmark times."""
        with torch.inference_mode(), _tf32(self.context.tf32):
            return self.module(*inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.forward_prepared(self.prepare(inputs)).float()


class _tf32:
    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        if self.enabled:
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


def apply_recipe(
    recipe: Recipe,
    model: LoadedModel,
    example_inputs: tuple[torch.Tensor, ...],
    device: str | torch.device,
    *,
    skip_modules: frozenset[str] = frozenset(),
    preloaded: dict[str, Any] | None = None,
) -> Variant:
    """A fresh copy of the model with every step applied, in kind order; the original is never touched."""
    ctx = ApplyContext(torch.device(device), example_inputs, skip_modules=skip_modules)
    ctx.artifacts["loaded_model"] = model
    ctx.artifacts.update(preloaded or {})
    module = copy.deepcopy(model.module).eval().to(ctx.device)
    for step in recipe.steps:
        reason = step.applies_to(model, ctx)
        if reason:
            raise NotApplicable(f"{step.label}: {reason}")
        started = time.perf_counter()
        module = step.apply(module, ctx)
        if step.kind == "graph":
            ctx.compile_s += time.perf_counter() - started
    return Variant(module, recipe, ctx)
