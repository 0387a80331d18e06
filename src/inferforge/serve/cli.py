"""`inferforge serve` and `inferforge loadtest`, with flags built from `ServerConfig` and `LoadTestConfig`.

Each field becomes a flag whose default is the field's default and whose help is the field's docstring, so the
help text and the code never disagree. Tuple fields take comma-separated values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import typing
from collections.abc import Callable

import typer

from inferforge.errors import InferforgeError


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (read from its source)."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, after in itertools.pairwise(body):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def command_from(cls: type, action: Callable[[typing.Any], None], positional: tuple[str, ...], doc: str):  # type: ignore[no-untyped-def]
    """A typer command whose parameters are the dataclass's fields."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    params, annotations, tuples = [], {}, set()
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default
        if typing.get_origin(kind) is tuple:
            tuples.add(f.name)
            kind, default = str, ",".join(str(v) for v in default)  # type: ignore[union-attr]
        help_text = docs.get(f.name, "")
        if f.name in positional:
            marker = typer.Argument(..., help=help_text)
        else:
            required = default is dataclasses.MISSING
            marker = typer.Option(... if required else default, help=help_text)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=marker, annotation=kind)
        )
        annotations[f.name] = kind

    def command(**kwargs: typing.Any) -> None:
        for name in tuples:
            text = kwargs[name].strip()
            try:
                kwargs[name] = tuple(int(v) for v in text.split(",") if v.strip()) if text else ()
            except ValueError:
                raise InferforgeError(
                    f"--{name.replace('_', '-')} {text!r}: give integers like 8,16,32"
                ) from None
        try:
            config = cls(**kwargs)
        except ValueError as exc:
            raise InferforgeError(str(exc)) from None
        action(config)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = doc
    return command


def _serve(config: typing.Any) -> None:
    from inferforge.serve.server import serve

    typer.echo(
        f"inferforge serve: {config.model_path} on http://{config.host}:{config.port} (KServe V2)", err=True
    )
    serve(config)


def _loadtest(config: typing.Any) -> None:
    from inferforge.serve.loadtest import format_report, run

    report = run(config)
    typer.echo(format_report(report))
    if report["ok"] == 0:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    from inferforge.serve.loadtest import LoadTestConfig
    from inferforge.serve.server import ServerConfig

    app.command("serve")(
        command_from(
            ServerConfig,
            _serve,
            ("model_path",),
            "Serve an artifact, run folder or model repository over the KServe V2 / Open Inference Protocol.",
        )
    )
    app.command("loadtest")(
        command_from(
            LoadTestConfig,
            _loadtest,
            ("url",),
            "Load-test a V2 server: closed loop (concurrency N) or open-loop Poisson (--scenario server).",
        )
    )


def main() -> None:
    """`python -m inferforge.serve.cli`: the same commands without the rest of the CLI."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register(app)
    try:
        app()
    except InferforgeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
