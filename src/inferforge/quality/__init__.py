"""Validate: every variant against the fp32 original on real data, held to the user's budget."""

from inferforge.quality.gate import Budget, QualityReport, evaluate, judge, run_outputs

__all__ = ["Budget", "QualityReport", "evaluate", "judge", "run_outputs"]
