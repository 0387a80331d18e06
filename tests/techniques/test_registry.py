from __future__ import annotations

import pytest
import torch

from inferforge.errors import NotApplicable, TechniqueError
from inferforge.techniques import REGISTRY, Recipe, apply_recipe, parse_technique, technique_names


def test_every_issue_technique_is_registered() -> None:
    expected = {
        "fp32",
        "tf32",
        "bf16",
        "fp16",
        "channels_last",
        "int8_weight",
        "int8_dynamic",
        "fp8",
        "int4_weight",
        "compile",
        "onnxruntime",
    }
    assert expected <= set(technique_names())


def test_unknown_technique_lists_the_known_ones() -> None:
    with pytest.raises(TechniqueError, match=r"unknown technique 'int3'.*bf16"):
        Recipe.parse("bf16+int3")


def test_parameters_are_parsed_and_checked() -> None:
    assert parse_technique("compile:mode=cudagraphs,freezing=false").to_json() == {
        "name": "compile",
        "version": 1,
        "mode": "cudagraphs",
        "freezing": False,
    }
    with pytest.raises(TechniqueError, match="no parameter"):
        parse_technique("compile:speed=11")
    with pytest.raises(TechniqueError, match="mode must be one of"):
        parse_technique("compile:mode=warp")
    with pytest.raises(TechniqueError, match="group_size"):
        parse_technique("int4_weight:group_size=100")


def test_recipe_orders_by_kind_and_refuses_two_of_a_kind() -> None:
    assert Recipe.parse("compile+int8_weight+bf16").label == "bf16+int8_weight+compile"
    with pytest.raises(TechniqueError, match="two techniques of one kind"):
        Recipe.parse("bf16+fp16")
    recipe = Recipe.parse("bf16+int4_weight:group_size=64")
    assert Recipe.from_json(recipe.to_json()) == recipe


@pytest.mark.parametrize(
    ("recipe", "reason"),
    [
        ("fp16", "emulated on CPUs"),
        ("tf32", "NVIDIA GPU"),
        ("bf16+fp8", "compute capability 8.9"),
        ("bf16+int4_weight", "CUDA only"),
        ("compile:mode=cudagraphs", "needs a CUDA GPU"),
        ("channels_last", "no input is 4-D"),
    ],
)
def test_cpu_refuses_what_cannot_run_here_with_a_reason(digits, recipe: str, reason: str) -> None:
    model, data = digits
    with pytest.raises(NotApplicable, match=reason):
        apply_recipe(Recipe.parse(recipe), model, data.rows(slice(0, 2)), "cpu")


def test_registering_a_technique_is_one_class() -> None:
    from dataclasses import dataclass

    from inferforge.techniques import TechniqueConfig, register

    @register
    @dataclass(frozen=True)
    class Halve(TechniqueConfig):
        name = "test_halve"
        kind = "layout"

        def apply(self, module, ctx):
            return torch.nn.Sequential(module, torch.nn.Identity())

    try:
        assert Recipe.parse("test_halve").steps[0].label == "test_halve"
    finally:
        REGISTRY.pop("test_halve")
