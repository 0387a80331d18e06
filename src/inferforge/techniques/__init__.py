"""Techniques: one module per way of making a model faster, each a config dataclass registered by name."""

from inferforge.techniques.base import (
    REGISTRY,
    ApplyContext,
    Recipe,
    TechniqueConfig,
    Variant,
    apply_recipe,
    parse_technique,
    register,
    technique_names,
)

__all__ = [
    "REGISTRY",
    "ApplyContext",
    "Recipe",
    "TechniqueConfig",
    "Variant",
    "apply_recipe",
    "parse_technique",
    "register",
    "technique_names",
]
