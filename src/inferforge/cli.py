"""The one command-line app. Each command is a thin call into one stage's public function.

Stages register their own commands (`register(app)`) so this module stays small and each stage's flags live
beside the configuration they fill. Heavy imports happen inside the commands, so `inferforge --help` is fast.
"""

from __future__ import annotations

import sys

import typer

from inferforge.errors import InferforgeError

app = typer.Typer(
    name="inferforge",
    help="Optimize, validate, benchmark and serve deep-learning models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register_stages() -> None:
    from inferforge.tune import cli as tune_cli

    tune_cli.register(app)
    for module_name in ("inferforge.serve.cli", "inferforge.serve.openai.cli", "inferforge.llm.cli"):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(app)


_register_stages()


def main() -> None:
    """Entry point: user errors become one red line and exit code 2, never a traceback."""
    try:
        app()
    except InferforgeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
