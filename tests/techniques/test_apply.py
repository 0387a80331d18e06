"""Each CPU technique on the trained digits classifier: close to fp32 by a stated margin, original
untouched."""

from __future__ import annotations

import pytest
import torch

from inferforge.models import load_model
from inferforge.techniques import Recipe, apply_recipe


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("recipe", "max_rel_err"),
    [
        ("fp32", 1e-6),
        ("bf16", 3e-2),
        ("int8_weight", 3e-2),
        ("int8_dynamic", 6e-2),
        ("bf16+int8_weight", 5e-2),
        ("onnxruntime", 1e-4),
    ],
)
def test_variant_stays_close_to_fp32(digits, recipe: str, max_rel_err: float) -> None:
    model, data = digits
    x = data.rows(slice(0, 128))
    reference = model.module(*x).detach()
    before = {k: v.clone() for k, v in model.module.state_dict().items()}
    variant = apply_recipe(Recipe.parse(recipe), model, data.rows(slice(0, 2)), "cpu")
    out = variant(*x)
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert _rel(out, reference) <= max_rel_err
    assert (out.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.97
    assert all(torch.equal(before[k], v) for k, v in model.module.state_dict().items())


def test_int8_really_quantizes_the_weights(digits) -> None:
    model, data = digits
    variant = apply_recipe(Recipe.parse("int8_weight"), model, data.rows(slice(0, 2)), "cpu")
    from inferforge.bench.memory import model_size_bytes

    assert model_size_bytes(variant.module) < 0.5 * model_size_bytes(model.module)
    assert any("Linear layers quantized" in n for n in variant.context.notes)


def test_skip_modules_keep_layers_in_higher_precision() -> None:
    model = load_model("factories:outlier_mlp", task="tensor")
    from inferforge.models import load_data

    data = load_data("random:8:64", model)
    variant = apply_recipe(
        Recipe.parse("int8_weight"), model, data.rows(slice(0, 2)), "cpu", skip_modules=frozenset({"2"})
    )
    assert any("2 Linear layers quantized, kept ['2']" in n for n in variant.context.notes)
    assert type(variant.module[2].weight).__name__ == "Parameter"
    assert type(variant.module[0].weight).__name__ != "Parameter"


def test_channels_last_and_compile_on_a_convolutional_factory() -> None:
    model = load_model("factories:small_cnn", task="classification")
    from inferforge.models import load_data

    data = load_data("random:16:3x16x16", model)
    reference = model.module(*data.rows(slice(None))).detach()
    variant = apply_recipe(Recipe.parse("channels_last+compile"), model, data.rows(slice(0, 2)), "cpu")
    assert variant.context.channels_last_inputs and variant.context.compile_s > 0
    assert _rel(variant(*data.rows(slice(None))), reference) < 1e-4
