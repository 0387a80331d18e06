"""The fallback finds the layer whose int8 weights break the model and keeps only that one in full
precision."""

from __future__ import annotations

from inferforge.models import load_data, load_model
from inferforge.quality import Budget, evaluate, run_outputs
from inferforge.quality.sensitivity import fallback, layer_scores
from inferforge.techniques import Recipe, apply_recipe


def _setup():
    model = load_model("factories:outlier_mlp", task="tensor")
    data = load_data("random:128:64", model)
    return model, data, run_outputs(model.module, data)


def test_outlier_layer_scores_worst() -> None:
    model, data, reference = _setup()
    scores = layer_scores(Recipe.parse("int8_weight"), model, data, reference, "cpu")
    assert next(name for name, _ in scores) == "2"
    assert scores[0][1] > 10 * scores[1][1]


def test_fallback_keeps_the_sensitive_layer_and_passes() -> None:
    model, data, reference = _setup()
    budget = Budget(max_metric_drop=1.0, min_fidelity=0.99)
    plain = apply_recipe(Recipe.parse("int8_weight"), model, data.rows(slice(0, 2)), "cpu")
    assert not evaluate(plain, data, model.task, reference, budget).passed
    found = fallback(Recipe.parse("int8_weight"), model, data, reference, budget, "cpu", max_attempts=3)
    assert found.quality is not None and found.quality.passed
    assert found.kept == ("2",) and found.attempts == 1
    assert found.to_json()["kept"] == ["2"]
