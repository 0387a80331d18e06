"""The live view of a search (rich) and the table printed at its end."""

from __future__ import annotations

from collections.abc import Callable

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from inferforge.tune.results import CandidateResult, RunResult

STATUS_STYLE = {
    "passed": "green",
    "failed_quality": "red",
    "slo_miss": "yellow",
    "not_applicable": "dim",
    "error": "magenta",
}


def _short(result: CandidateResult) -> str:
    if result.bench:
        batch, throughput = result.bench.best_throughput
        speed = f"{throughput:,.0f}/s at bs{batch}"
    else:
        speed = "-"
    quality = f"drop {result.quality.metric_drop:+.2f}" if result.quality else ""
    return f"{speed} {quality} {result.reason[:90]}"


class Display:
    """A spinner per candidate while it runs, a line per candidate when it ends."""

    def __init__(self, enabled: bool = True, console: Console | None = None) -> None:
        self.enabled = enabled
        self.console = console or Console(
            stderr=True, width=None if Console(stderr=True).is_terminal else 160
        )
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=not enabled,
        )
        self.task_id = None

    def __enter__(self) -> Display:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    def start(self, label: str) -> Callable[[str], None]:
        if self.task_id is not None:
            self.progress.remove_task(self.task_id)
        self.task_id = self.progress.add_task(f"{label}: starting", total=None)

        def on_stage(stage: str) -> None:
            self.progress.update(self.task_id, description=f"[bold]{label}[/]: {stage}")

        return on_stage

    def finish(self, result: CandidateResult) -> None:
        """Printed in quiet mode too, so a log shows how far a long search got."""
        style = STATUS_STYLE.get(result.status, "white")
        self.progress.console.print(
            f"[{style}]{result.status:>14}[/] {result.recipe:<38} {_short(result)} ({result.seconds:.0f} s)"
        )


def summary_table(run: RunResult) -> Table:
    """One row per candidate: status, quality, speed, size, and speed-ups against the baseline and the
    peer."""
    table = Table(
        title=f"inferforge optimize: {run.config['model']} on "
        f"{run.environment.get('device_name', run.environment['device'])}"
    )
    for column in (
        "recipe",
        "status",
        "metric drop",
        "fidelity",
        "p50 ms (bs min)",
        "best items/s (bs)",
        f"x {run.baseline}",
        f"x {run.peer or '-'}",
        "MB",
        "compile s",
    ):
        table.add_column(column, justify="left" if column in ("recipe", "status") else "right")
    for c in run.candidates:
        q, b = c.quality, c.bench
        mark = " *" if c.recipe == run.chosen else ""
        table.add_row(
            c.recipe + mark,
            f"[{STATUS_STYLE.get(c.status, 'white')}]{c.status}[/]",
            f"{q.metric_drop:.2f}" if q else "-",
            f"{q.primary_fidelity:.4f}" if q else "-",
            f"{b.single_stream_ms:.3f}" if b else "-",
            f"{b.best_throughput[1]:,.0f} ({b.best_throughput[0]})" if b else "-",
            _ratio(c.speedup_vs_baseline),
            _ratio(c.speedup_vs_peer),
            f"{b.size_bytes / 1e6:.1f}" if b else "-",
            f"{b.compile_s:.1f}" if b and b.compile_s else "-",
        )
    return table


def _ratio(value: float | None) -> str:
    if value is None:
        return "-"
    style = "red" if value < 1.0 else "green"
    return f"[{style}]{value:.2f}[/]"
