"""Tune: enumerate candidates, validate and time them, choose, and report."""

from inferforge.tune.config import OptimizeConfig
from inferforge.tune.results import CandidateResult, RunResult
from inferforge.tune.search import optimize

__all__ = ["CandidateResult", "OptimizeConfig", "RunResult", "optimize"]
