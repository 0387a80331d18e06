"""`results.json` (machine-readable, versioned) and `report.html` (tables and plots, opens without a
server)."""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from inferforge.tune.results import CandidateResult, RunResult


def write_report(run: RunResult, out: Path) -> None:
    (out / "results.json").write_text(json.dumps(run.to_json(), indent=2, default=_json_default))
    (out / "report.html").write_text(render_html(run))


def _json_default(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode()


def _plots(run: RunResult) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [c for c in run.candidates if c.bench]
    plots = []
    for key, title, ylabel in (
        ("throughput", "Throughput per batch size", "items / s"),
        ("p50_ms", "Latency (p50) per batch size", "ms per batch"),
    ):
        figure, axis = plt.subplots(figsize=(7.5, 4.5))
        for c in timed:
            sizes = sorted(c.bench.per_batch)
            values = [getattr(c.bench.per_batch[b], key) for b in sizes]
            axis.plot(
                sizes,
                values,
                marker="o",
                label=c.recipe,
                linewidth=2.5 if c.recipe == run.chosen else 1,
                linestyle="-" if c.passed else ":",
            )
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set(title=title, xlabel="batch size", ylabel=ylabel)
        axis.legend(fontsize=7, ncol=2)
        axis.grid(alpha=0.3)
        plots.append((title, _png(figure)))
        plt.close(figure)
    plots.append(("Quality vs speed", _quality_speed_plot(run, timed, plt)))
    return plots


def _quality_speed_plot(run: RunResult, timed: list[CandidateResult], plt) -> str:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    points = [
        (c, c.bench.best_throughput[1], c.quality.metric_drop)
        for c in timed
        if c.quality and math.isfinite(c.quality.metric_drop)
    ]
    for c, speed, drop in points:
        axis.scatter(
            speed, drop, color="tab:green" if c.passed else "tab:red", s=90 if c.recipe == run.chosen else 30
        )
        axis.annotate(c.recipe, (speed, drop), fontsize=7, xytext=(3, 3), textcoords="offset points")
    front = sorted((p for p in points if p[0].recipe in run.pareto), key=lambda p: p[1])
    if front:
        axis.plot(
            [p[1] for p in front], [p[2] for p in front], color="gray", linestyle="--", label="Pareto front"
        )
        axis.legend(fontsize=8)
    axis.set_xscale("log")
    axis.set(
        title="Metric drop vs best throughput (green passed, red failed)",
        xlabel="items / s",
        ylabel=f"{run.data['metric_name']} drop (points)",
    )
    axis.grid(alpha=0.3)
    encoded = _png(figure)
    plt.close(figure)
    return encoded


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.4g}"
    return html.escape(str(value))


def _rows(run: RunResult) -> str:
    rows = []
    for c in run.candidates:
        q, b = c.quality, c.bench
        best = b.best_throughput if b else None
        cells = [
            c.recipe + (" (chosen)" if c.recipe == run.chosen else ""),
            c.stage,
            c.status,
            q.metric if q else None,
            q.metric_drop if q else None,
            q.primary_fidelity if q else None,
            b.single_stream_ms if b else None,
            b.per_batch[min(b.per_batch)].p99_ms if b else None,
            f"{best[1]:,.0f} (bs {best[0]})" if best else None,
            c.speedup_vs_baseline,
            c.speedup_vs_peer,
            b.size_bytes / 1e6 if b else None,
            (b.peak_mem_bytes or 0) / 1e6 if b and b.peak_mem_bytes else None,
            b.compile_s if b else None,
            c.cost_per_million_usd,
            c.reason or "; ".join(c.notes),
        ]
        slow = c.speedup_vs_baseline is not None and c.speedup_vs_baseline < 1
        css = "chosen" if c.recipe == run.chosen else ("bad" if not c.passed else ("slow" if slow else ""))
        rows.append(f"<tr class='{css}'>" + "".join(f"<td>{_cell(v)}</td>" for v in cells) + "</tr>")
    return "\n".join(rows)


HEAD = (
    "recipe",
    "stage",
    "status",
    "metric",
    "drop (pts)",
    "fidelity",
    "p50 ms (bs min)",
    "p99 ms (bs min)",
    "best throughput",
    "x fp32",
    "x bf16",
    "size MB",
    "peak MB",
    "compile s",
    "$ / M items",
    "reason / notes",
)


def render_html(run: RunResult) -> str:
    plots = "".join(
        f"<h2>{html.escape(t)}</h2><img src='data:image/png;base64,{p}'/>" for t, p in _plots(run)
    )
    env = run.environment
    synthetic = (
        "<p class='bad'>Synthetic data: speed and fidelity only, no accuracy claim.</p>"
        if run.data["synthetic"]
        else ""
    )
    return f"""<!doctype html><html><head><meta charset='utf-8'><title>inferforge report</title><style>
body{{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}} \
table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:4px 6px;text-align:right}} \
td:first-child,td:last-child{{text-align:left}}
tr.chosen{{background:#d9f7d9;font-weight:bold}} tr.bad{{color:#a00}} \
tr.slow td:nth-child(10){{color:#a00}}
.bad{{color:#a00}} img{{max-width:100%}}</style></head><body>
<h1>inferforge optimize: {html.escape(str(run.config["model"]))}</h1>
<p>Device: {html.escape(str(env.get("device_name", env["device"])))} · \
data: {html.escape(str(run.data["source"]))}
({run.data["rows"]} rows, fingerprint {run.data["fingerprint"][:12]}) · objective: {run.config["objective"]} ·
budget: metric drop ≤ {run.config["max_metric_drop"]} points, fidelity ≥ {run.config["min_fidelity"]} ·
search took {run.elapsed_s:.0f} s</p>{synthetic}
<p>Chosen: <b>{html.escape(str(run.chosen))}</b>. Reference {run.data["metric_name"]}:
{run.data["reference_metric"]:.3f}. Pareto front: {html.escape(", ".join(run.pareto))}.</p>
<table><tr>{"".join(f"<th>{h}</th>" for h in HEAD)}</tr>{_rows(run)}</table>{plots}
<p>Versions: {html.escape(json.dumps(env.get("versions", {})))}</p></body></html>"""
