"""A candidate that blows up with any library's exception is recorded as an error; the search goes on."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from inferforge.techniques import REGISTRY, TechniqueConfig, register
from inferforge.tune import OptimizeConfig, optimize


@register
@dataclass(frozen=True)
class Explodes(TechniqueConfig):
    name = "test_explodes"
    kind = "layout"

    def apply(self, module, ctx):
        raise OSError("a library failed in a way nobody planned for")


def test_failing_candidate_is_an_error_row_not_a_crash(tmp_path: Path) -> None:
    try:
        config = OptimizeConfig(
            model="builtin:digits",
            techniques="fp32,test_explodes",
            batch_sizes="4",
            out=tmp_path / "run",
            min_time_s=0.05,
            warmup=1,
            quiet=True,
        )
        run = optimize(config)
    finally:
        REGISTRY.pop("test_explodes")
    row = run.candidate("test_explodes")
    assert row.status == "error" and "OSError: a library failed" in row.reason
    assert run.chosen == "fp32" and (tmp_path / "run" / "results.json").is_file()
