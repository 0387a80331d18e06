"""`inferforge optimize` end to end, through the real CLI in a subprocess, on the built-in models."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FAST = ["--min-time-s", "0.05", "--warmup", "1", "--quiet"]


def _optimize(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).parents[1]) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    return subprocess.run(
        [sys.executable, "-m", "inferforge.cli", "optimize", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=cwd,
        env=env,
    )


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("run") / "digits"
    result = _optimize(
        "--model",
        "builtin:digits",
        "--batch-sizes",
        "1,32",
        "--gpu-hourly-usd",
        "3.6",
        "--out",
        str(out),
        *FAST,
        cwd=out.parent,
    )
    return result, out


def test_digits_run_chooses_a_passing_variant_and_writes_everything(digits_run) -> None:
    result, out = digits_run
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((out / "results.json").read_text())
    assert run["schema_version"] == 1 and run["data"]["has_labels"] and run["data"]["reference_metric"] > 95
    chosen = next(c for c in run["candidates"] if c["recipe"] == run["chosen"])
    assert chosen["status"] == "passed" and chosen["quality"]["metric_drop"] <= 1.0
    timed = [
        c for c in run["candidates"] if c["bench"] and c["stage"] != "baseline" and c["status"] == "passed"
    ]
    best = max(c["bench"]["offline"]["throughput"] for c in timed)
    assert chosen["bench"]["offline"]["throughput"] == best
    stages = {c["stage"] for c in run["candidates"]}
    assert {"eager", "compiled"} <= stages
    for c in run["candidates"]:
        if c["bench"]:
            assert set(c["bench"]["per_batch"]) == {"1", "32"}
            assert c["speedup_vs_baseline"] > 0
            # $3.6/h is $0.001/s: a million items cost 1000 / throughput dollars
            assert abs(c["cost_per_million_usd"] - 1000 / c["bench"]["offline"]["throughput"]) < 1e-9
    assert run["chosen"] in run["pareto"]
    html = (out / "report.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 3 and run["chosen"] in html
    assert "chosen:" in result.stdout


def test_digits_artifact_serves_the_same_outputs(digits_run) -> None:
    from inferforge.registry import examples, load_servable

    _, out = digits_run
    servable = load_servable(out)
    stored = examples(out)
    got = servable.predict({"input": stored["input.input"].numpy()})["logits"]
    np.testing.assert_allclose(got, stored["output"].numpy(), atol=1e-4)


def test_default_model_and_data_run(tmp_path: Path) -> None:
    """The README's main job (built-in MiniLM on standard-library text), trimmed to two candidates for CI."""
    out = tmp_path / "default"
    result = _optimize(
        "--techniques",
        "fp32,int8_dynamic",
        "--batch-sizes",
        "8",
        "--fallback-attempts",
        "0",
        "--out",
        str(out),
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    run = json.loads((out / "results.json").read_text())
    assert run["config"]["model"] == "builtin:minilm" and run["data"]["source"] == "builtin:stdlib-text"
    int8 = next(c for c in run["candidates"] if c["recipe"].startswith("int8_dynamic"))
    assert int8["quality"]["fidelity"]["cosine_mean"] > 0.95


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--techniques", "bf16+int3"], "unknown technique 'int3'"),
        (["--model", "/nope/model.pt2"], "does not exist (flag --model)"),
        (["--data", "/nope/data.npz"], "does not exist (flag --data)"),
        (["--objective", "fastest"], "--objective must be one of"),
        (["--batch-sizes", "1,x"], "--batch-sizes must be comma-separated integers"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = _optimize("--model", "builtin:digits", *args, "--out", str(tmp_path / "x"), *FAST, cwd=tmp_path)
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr


def test_data_whose_shape_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, input=np.zeros((4, 10), dtype=np.float32))
    result = _optimize(
        "--model", "builtin:digits", "--data", str(path), "--out", str(tmp_path / "x"), *FAST, cwd=tmp_path
    )
    assert result.returncode == 2 and "expects (-1, 64)" in result.stderr


def test_budget_no_candidate_meets_still_writes_the_report(tmp_path: Path) -> None:
    out = tmp_path / "strict"
    result = _optimize(
        "--model",
        "builtin:digits",
        "--techniques",
        "bf16,int8_dynamic",
        "--min-fidelity",
        "1.0",
        "--max-metric-drop",
        "0",
        "--fallback-attempts",
        "0",
        "--batch-sizes",
        "4",
        "--objective",
        "latency",
        "--latency-slo-ms",
        "0.000001",
        "--out",
        str(out),
        *FAST,
        cwd=tmp_path,
    )
    assert result.returncode == 2 and "no candidate met the budget" in result.stderr
    run = json.loads((out / "results.json").read_text())
    assert run["chosen"] is None and (out / "report.html").is_file() and not (out / "artifact").exists()
    assert all(
        c["status"] in ("failed_quality", "slo_miss") for c in run["candidates"] if c["stage"] == "eager"
    )
