"""Build an artifact straight from a model and a recipe, without a search: for servers, tests and scripts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from inferforge.models import load_data, load_model
from inferforge.registry.artifact import save_artifact
from inferforge.techniques import Recipe, apply_recipe


def export_artifact(
    out_dir: str | Path,
    model: str,
    *,
    recipe: Sequence[str] | str = ("fp32",),
    device: str = "cpu",
    task: str | None = None,
    data: str | None = None,
    name: str | None = None,
    batch_sizes: tuple[int, ...] = (1, 8, 64),
) -> Path:
    """Load `model` (any source `optimize` takes), apply `recipe` and write the artifact folder."""
    loaded = load_model(model, task)
    eval_data = load_data(data, loaded)
    steps = recipe if isinstance(recipe, str) else "+".join(recipe)
    parsed = Recipe.parse(steps)
    with torch.inference_mode():
        variant = apply_recipe(parsed, loaded, eval_data.rows(slice(0, 2)), device)
    default_name = model.removeprefix("builtin:").replace(":", "_").replace(".", "_").split("/")[-1]
    return save_artifact(
        Path(out_dir),
        name=name or default_name,
        model=loaded,
        data=eval_data,
        variant=variant,
        batch_sizes=batch_sizes,
    )
