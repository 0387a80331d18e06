"""Tune: enumerate candidates, validate and time them, choose, and report.

Names load on first use so that `inferforge --help` (which imports `inferforge.tune.cli`) does not import
torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CandidateResult", "OptimizeConfig", "RunResult", "optimize"]


def __getattr__(name: str) -> Any:
    if name == "OptimizeConfig":
        from inferforge.tune.config import OptimizeConfig

        return OptimizeConfig
    if name in ("CandidateResult", "RunResult"):
        from inferforge.tune import results

        return getattr(results, name)
    if name == "optimize":
        from inferforge.tune.search import optimize

        return optimize
    raise AttributeError(name)
