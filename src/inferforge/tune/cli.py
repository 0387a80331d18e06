"""`inferforge optimize`, its flags generated from `OptimizeConfig` so the help text is the config's own."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import typer

from inferforge.tune.config import OptimizeConfig


def _parameters() -> list[inspect.Parameter]:
    hints = typing.get_type_hints(OptimizeConfig)
    params = []
    for field in dataclasses.fields(OptimizeConfig):
        flag = "--" + field.name.replace("_", "-")
        option = typer.Option(field.default, flag, help=field.metadata["help"], show_default=True)
        params.append(
            inspect.Parameter(
                field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=hints[field.name]
            )
        )
    return params


def optimize_command(**kwargs: typing.Any) -> None:
    """Find the fastest variant of a model that keeps quality within budget; write results, report,
    artifact."""
    from rich.console import Console

    from inferforge.errors import BudgetError
    from inferforge.registry import save_artifact
    from inferforge.tune.display import summary_table
    from inferforge.tune.search import optimize

    config = OptimizeConfig(**kwargs)
    console = Console(width=None if Console().is_terminal else 170)
    try:
        run = optimize(config, save_artifact=save_artifact)
    except BudgetError as error:
        run = getattr(error, "run", None)
        if run is not None:
            console.print(summary_table(run))
        raise
    console.print(summary_table(run))
    console.print(f"chosen: [bold green]{run.chosen}[/]  ({run.elapsed_s:.0f} s)")
    console.print(f"wrote {config.out}/results.json, {config.out}/report.html, {run.artifact}")


optimize_command.__signature__ = inspect.Signature(_parameters())  # type: ignore[attr-defined]


def register(app: typer.Typer) -> None:
    app.command("optimize")(optimize_command)
