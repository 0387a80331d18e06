"""Serve ResNet-50 (bf16, channels-last) over V2 and compare with the engine's own offline throughput.

One run measures, on one GPU:
  1. offline: `Servable.predict` on batches of `--max-batch` (numpy in, numpy out: the copies the server
     also pays), median over rotating inputs; and `predict` at batch 1, one request's compute time;
  2. low load: one closed-loop client, batch-1 requests, binary tensors, `--low-reps` times per server
     config: the server's p50 over that time, and (one process) the server's own split of a request's time
     from the statistics extension (queue, input, infer, output, and the HTTP layer around them);
  3. saturation: closed-loop load from several client processes (binary tensors) for each request size and
     instance count: the server's rows/s against the offline rows/s; then a no-op model of the same
     signature, the HTTP layer's own ceiling.
The model comes from `export_artifact("torchvision.models:resnet50", recipe=bf16+channels_last)` when it
builds, else from the wrapper in `resnet_servable.py` (the report says which). Random weights; no downloads.

    python benchmarks/serve/bench_resnet50.py --out $OUT --http-workers 1,8 --instances 1 --no-ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def small_cnn():  # type: ignore[no-untyped-def]
    """A CPU stand-in for smoke-testing this script where torchvision is absent."""
    import torch

    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 10),
    )


def build_model(args: argparse.Namespace, work: Path) -> tuple[Path, str | None, str, str]:
    """(path to serve, --loader or None, how it was built, error of the preferred path if it failed)."""
    try:
        from inferforge.registry import export_artifact

        art = export_artifact(
            work / "resnet50" / "1",
            args.factory,
            recipe=tuple(args.recipe.split(",")),
            device=args.device,
            data=f"random:8:{args.shape}",
            name="resnet50",
            batch_sizes=(1, 8, 32, args.max_batch),
        )
        return art.parent.parent, None, f"export_artifact({args.factory}, recipe={args.recipe})", ""
    except Exception as exc:  # the fallback keeps the run useful; the report names the failure
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    sys.path.insert(0, str(ROOT))
    from benchmarks.serve.resnet_servable import write

    write(work / "fallback" / "resnet50" / "1", max_batch_size=args.max_batch)
    return (
        work / "fallback",
        "benchmarks.serve.resnet_servable:load",
        "own wrapper (resnet_servable.py)",
        error,
    )


def load_for_offline(path: Path, loader: str | None, device: str):  # type: ignore[no-untyped-def]
    from inferforge.serve.server import resolve_loader

    return resolve_loader(loader)(path / "resnet50" / "1", device=device, name="resnet50", version="1")


def median_seconds(fn, warmup: int, iters: int) -> float:  # type: ignore[no-untyped-def]
    for i in range(warmup):
        fn(i)
    times = []
    for i in range(iters):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def offline(servable, shape: tuple[int, ...], batch: int, iters: int) -> float:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(batch)
    inputs = [rng.standard_normal((batch, *shape), dtype=np.float32) for _ in range(3)]
    return median_seconds(lambda i: servable.predict({"input": inputs[i % 3]}), 5, iters)


def gpu_forward_ms(servable, shape: tuple[int, ...], batch: int) -> float | None:  # type: ignore[no-untyped-def]
    """The variant's forward alone, inputs already on the GPU, timed with CUDA events (context only)."""
    import torch

    variant = getattr(servable, "variant", None)
    if variant is None or not torch.cuda.is_available():
        return None
    x = variant.prepare((torch.randn(batch, *shape),))
    for _ in range(5):
        variant.forward_prepared(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        variant.forward_prepared(x)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(
    path: Path, loader: str | None, args: argparse.Namespace, instances: int, log: Path, http_workers: int = 1
):  # type: ignore[no-untyped-def]
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "inferforge.serve.cli",
        "serve",
        str(path),
        "--port",
        str(port),
        "--device",
        args.device,
        "--max-batch-size",
        str(args.max_batch),
        "--instances",
        str(instances),
        "--max-queue-size",
        "8192",
        "--max-body-mib",
        "512",
        "--http-workers",
        str(http_workers),
    ]
    if loader:
        cmd += ["--loader", loader]
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    proc = subprocess.Popen(cmd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    streak = 0  # with several processes, each new connection may reach another one: all must be ready
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()[-3000:]}")
        try:
            ok = urllib.request.urlopen(url + "/v2/health/ready", timeout=1).status == 200
        except OSError:
            ok = False
        streak = streak + 1 if ok else 0
        if streak >= 10 * http_workers:
            return proc, url
        time.sleep(0.05 if ok else 0.2)
    proc.kill()
    raise RuntimeError("server never became ready")


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        for name in (
            "inferforge_batch_size",
            "inferforge_compute_seconds",
            "inferforge_queue_seconds",
            "inferforge_request_latency_seconds",
        ):
            for part in ("sum", "count"):
                if line.startswith(f"{name}_{part}{{"):
                    out[f"{name}_{part}"] = out.get(f"{name}_{part}", 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def delta_means(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    def mean(name: str) -> float:
        n = after.get(f"{name}_count", 0) - before.get(f"{name}_count", 0)
        return (after.get(f"{name}_sum", 0) - before.get(f"{name}_sum", 0)) / n if n else float("nan")

    return {
        "mean_batch_rows": mean("inferforge_batch_size"),
        "mean_compute_ms": mean("inferforge_compute_seconds") * 1e3,
        "mean_queue_ms": mean("inferforge_queue_seconds") * 1e3,
        "mean_server_latency_ms": mean("inferforge_request_latency_seconds") * 1e3,
    }


def stats(url: str) -> dict[str, float]:
    """The statistics extension's cumulative counts for the model (one process's view)."""
    doc = json.loads(urllib.request.urlopen(url + "/v2/models/resnet50/stats", timeout=5).read())
    s = doc["model_stats"][0]["inference_stats"]
    return {k: float(v["ns"]) for k, v in s.items()} | {f"{k}_count": float(v["count"]) for k, v in s.items()}


def per_request_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean ms per request of each phase between two `stats` readings; `http` is the server's time around
    the engine (reading, parsing, answering), `success` minus queue and compute."""
    n = after["success_count"] - before["success_count"]
    if not n:
        return {}
    phases = ("success", "queue", "compute_input", "compute_infer", "compute_output")
    out = {k: (after[k] - before[k]) / n / 1e6 for k in phases}
    out["http"] = out["success"] - sum(out[k] for k in phases[1:])
    return out


def low_load(url: str, args: argparse.Namespace, instances: int, workers: int) -> dict:
    """One closed-loop client, batch 1, `--low-reps` times; with one process, the server's own split of each
    request's time (statistics extension) too."""
    reps = []
    for _ in range(args.low_reps):
        before = scrape(url)
        split_before = stats(url) if workers == 1 else None
        low = load(url, concurrency=1, duration=args.low_seconds, batch_size=1)
        low["server"] = delta_means(before, scrape(url))
        if split_before is not None:
            low["server_split_ms"] = per_request_ms(split_before, stats(url))
        reps.append(low)
    return {"instances": instances, "http_workers": workers, "reps": reps}


def load(url: str, **kwargs) -> dict:  # type: ignore[no-untyped-def]
    from inferforge.serve.loadtest import LoadTestConfig, run

    return run(LoadTestConfig(url=url, model="resnet50", slo_ms=1000.0, **kwargs))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--factory", default="torchvision.models:resnet50")
    parser.add_argument("--recipe", default="bf16,channels_last")
    parser.add_argument("--shape", default="3x224x224")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-batch", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--low-seconds", type=float, default=6.0)
    parser.add_argument("--low-reps", type=int, default=3, help="low-load repetitions per server config")
    parser.add_argument("--sat-seconds", type=float, default=10.0)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--instances", default="1,2")
    parser.add_argument(
        "--http-workers", default="1", help="comma-separated; each is run with every --instances"
    )
    parser.add_argument("--request-batches", default="1,8")
    parser.add_argument(
        "--ceiling",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also serve a no-op model of the same signature: the HTTP layer's own ceiling",
    )
    args = parser.parse_args()
    shape = tuple(int(d) for d in args.shape.split("x"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args)}
    try:
        import torch

        report["torch"] = torch.__version__
        report["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    except Exception as exc:
        report["torch"] = str(exc)
    path, loader, built, error = build_model(args, work)
    report.update(model_source=built, export_error=error)
    servable = load_for_offline(path, loader, args.device)
    b_max = offline(servable, shape, args.max_batch, args.iters)
    b_one = offline(servable, shape, 1, args.iters * 3)
    report["offline"] = {
        "batch": args.max_batch,
        "predict_ms": b_max * 1e3,
        "rows_per_s": args.max_batch / b_max,
        "predict_b1_ms": b_one * 1e3,
        "gpu_forward_ms": gpu_forward_ms(servable, shape, args.max_batch),
    }
    servable.close()
    del servable
    report["runs"] = []
    report["low_load"] = []
    configs = [(int(i), int(w)) for w in args.http_workers.split(",") for i in args.instances.split(",")]
    for instances, workers in configs:
        proc, url = start_server(
            path, loader, args, instances, out / f"server_i{instances}_w{workers}.log", workers
        )
        try:
            # Warm-up, discarded: enough connections that every HTTP worker process gets some.
            load(url, concurrency=4 * workers, duration=3.0, batch_size=1)
            load(url, concurrency=2 * workers, duration=2.0, batch_size=args.max_batch)
            report["low_load"].append(low_load(url, args, instances, workers))
            for rows in [int(r) for r in args.request_batches.split(",")]:
                conc = max(args.processes, 2 * args.max_batch // rows)
                before = scrape(url)
                sat = load(
                    url,
                    concurrency=conc,
                    duration=args.sat_seconds,
                    batch_size=rows,
                    processes=args.processes,
                )
                sat.update(
                    instances=f"{instances}x{workers}" if workers > 1 else instances,
                    request_rows=rows,
                    concurrency=conc,
                    server=delta_means(before, scrape(url)),
                )
                report["runs"].append(sat)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    if args.ceiling:
        sys.path.insert(0, str(ROOT))
        from benchmarks.serve.resnet_servable import write

        null_repo = work / "null"
        write(null_repo / "resnet50" / "1", max_batch_size=args.max_batch)
        proc, url = start_server(
            null_repo, "benchmarks.serve.resnet_servable:load_null", args, 1, out / "server_null.log"
        )
        try:
            load(url, concurrency=4, duration=2.0, batch_size=1)
            for rows in [int(r) for r in args.request_batches.split(",")]:
                conc = max(args.processes, 2 * args.max_batch // rows)
                sat = load(
                    url,
                    concurrency=conc,
                    duration=args.sat_seconds / 2,
                    batch_size=rows,
                    processes=args.processes,
                )
                sat.update(
                    instances="null",
                    request_rows=rows,
                    concurrency=conc,
                    server={
                        "mean_batch_rows": float("nan"),
                        "mean_compute_ms": float("nan"),
                        "mean_queue_ms": float("nan"),
                    },
                )
                report["runs"].append(sat)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2, default=str))
    print_table(report)


def print_table(report: dict) -> None:
    off = report["offline"]
    print(f"\n{report['gpu']}  torch {report['torch']}  model: {report['model_source']}")
    if report["export_error"]:
        print(f"export_artifact failed: {report['export_error'][:300]}")
    print(
        f"offline predict b={off['batch']}: {off['predict_ms']:.2f} ms -> {off['rows_per_s']:.0f} rows/s"
        f" (GPU forward alone {off['gpu_forward_ms'] or float('nan'):.2f} ms);"
        f" predict b=1: {off['predict_b1_ms']:.2f} ms"
    )
    for low in report["low_load"]:
        for i, rep in enumerate(low["reps"]):
            p50 = rep["latency_ms"]["p50"]
            split = rep.get("server_split_ms") or {}
            inside = (
                f"; in the server {split['success']:.2f} ms = queue {split['queue']:.2f} + input "
                f"{split['compute_input']:.2f} + infer {split['compute_infer']:.2f} + output "
                f"{split['compute_output']:.2f} + http {split['http']:.2f}"
                if split
                else ""
            )
            print(
                f"low load, {low['http_workers']} process(es), rep {i}: p50 {p50:.2f} ms, p99 "
                f"{rep['latency_ms']['p99']:.2f} ms, over predict b=1 {p50 - off['predict_b1_ms']:+.2f} ms"
                + inside
            )
    print(
        f"{'inst':>4} {'req rows':>8} {'conc':>5} {'rows/s':>9} {'vs offline':>10} {'p50 ms':>8}"
        f" {'p99 ms':>8} {'batch':>6} {'compute ms':>10} {'queue ms':>9} {'errors':>7}"
    )
    for r in report["runs"]:
        s = r["server"]
        errors = r["sent"] - r["ok"]
        print(
            f"{r['instances']:>4} {r['request_rows']:>8} {r['concurrency']:>5}"
            f" {r['throughput_rows_per_s']:>9.0f}"
            f" {r['throughput_rows_per_s'] / off['rows_per_s']:>9.1%} {r['latency_ms']['p50']:>8.1f}"
            f" {r['latency_ms']['p99']:>8.1f} {s['mean_batch_rows']:>6.1f} {s['mean_compute_ms']:>10.2f}"
            f" {s['mean_queue_ms']:>9.2f} {errors:>7}"
        )


if __name__ == "__main__":
    main()
