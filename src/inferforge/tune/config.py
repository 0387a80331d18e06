"""`OptimizeConfig`: every knob of `inferforge optimize`, with defaults, bounds and one line of help each.

The CLI builds its flags from these fields, so help text and defaults never disagree with the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from inferforge.errors import InferforgeError

OBJECTIVES = ("throughput", "latency", "memory")


class ConfigError(InferforgeError):
    """A flag's value is out of range; the message names the flag."""


def _help(text: str, **extra: object) -> dict:
    return {"help": text, **extra}


@dataclass(frozen=True)
class OptimizeConfig:
    model: str = field(
        default="builtin:minilm",
        metadata=_help(
            "Model: a Hugging Face folder, a .pt2 file, a factory 'pkg.mod:fn', or builtin:minilm / "
            "builtin:digits."
        ),
    )
    data: str | None = field(
        default=None,
        metadata=_help(
            "Evaluation data: .npz tensors (optional 'labels'), .jsonl text, builtin:digits, "
            "builtin:stdlib-text, or random:N:CxHxW (synthetic, speed only). Default: the built-in model's "
            "own data."
        ),
    )
    task: str | None = field(
        default=None,
        metadata=_help("classification, embedding or tensor. Default: what the model source implies."),
    )
    out: Path = field(
        default=Path("runs/default"), metadata=_help("Folder for results.json, report.html, artifact/.")
    )
    device: str = field(default="auto", metadata=_help("auto, cpu, cuda or cuda:N."))
    techniques: str = field(
        default="auto",
        metadata=_help(
            "Candidates: 'auto', or comma-separated recipes such as 'bf16,bf16+int8_weight,bf16+compile'."
        ),
    )
    batch_sizes: str = field(default="1,8,64", metadata=_help("Comma-separated batch sizes to benchmark."))
    objective: str = field(default="throughput", metadata=_help("throughput, latency or memory."))
    latency_slo_ms: float | None = field(
        default=None,
        metadata=_help(
            "Latency SLO in ms: with objective latency, p99 at the smallest batch must meet it; also runs "
            "the simulated server scenario."
        ),
    )
    max_metric_drop: float = field(
        default=1.0, metadata=_help("Largest allowed drop of the task metric, in percentage points.")
    )
    min_fidelity: float = field(
        default=0.99,
        metadata=_help(
            "Smallest allowed fidelity to the fp32 original (top-1 agreement, mean cosine, or 1 - relative "
            "error)."
        ),
    )
    fallback_attempts: int = field(
        default=3,
        metadata=_help(
            "How many times a failing quantized candidate retries with its most sensitive layers kept in "
            "higher precision (0 disables)."
        ),
    )
    compile_top: int = field(
        default=1,
        metadata=_help(
            "How many of the best passing eager candidates also get a torch.compile variant (with CUDA "
            "graphs on a GPU); each batch size compiles once per variant."
        ),
    )
    min_time_s: float = field(default=1.0, metadata=_help("Seconds of timed calls per batch size, at least."))
    warmup: int = field(default=5, metadata=_help("Untimed warm-up calls per batch size."))
    gpu_hourly_usd: float | None = field(
        default=None, metadata=_help("Price of the device per hour, to report cost per million items.")
    )
    quiet: bool = field(default=False, metadata=_help("No live progress display."))

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"--objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.latency_slo_ms is not None and self.latency_slo_ms <= 0:
            raise ConfigError(f"--latency-slo-ms must be positive, got {self.latency_slo_ms}")
        if not 0 <= self.max_metric_drop <= 100:
            raise ConfigError(f"--max-metric-drop must be in [0, 100] points, got {self.max_metric_drop}")
        if not 0 <= self.min_fidelity <= 1:
            raise ConfigError(f"--min-fidelity must be in [0, 1], got {self.min_fidelity}")
        if not 0 <= self.fallback_attempts <= 10:
            raise ConfigError(f"--fallback-attempts must be in [0, 10], got {self.fallback_attempts}")
        if not 0 <= self.compile_top <= 8:
            raise ConfigError(f"--compile-top must be in [0, 8], got {self.compile_top}")
        if self.gpu_hourly_usd is not None and self.gpu_hourly_usd <= 0:
            raise ConfigError(f"--gpu-hourly-usd must be positive, got {self.gpu_hourly_usd}")
        if self.min_time_s <= 0 or self.warmup < 0:
            raise ConfigError("--min-time-s must be positive and --warmup non-negative")
        self.parsed_batch_sizes()
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def parsed_batch_sizes(self) -> tuple[int, ...]:
        try:
            sizes = tuple(sorted({int(s) for s in self.batch_sizes.split(",") if s.strip()}))
        except ValueError:
            raise ConfigError(
                f"--batch-sizes must be comma-separated integers, got {self.batch_sizes!r}"
            ) from None
        if not sizes or sizes[0] < 1 or sizes[-1] > 65536:
            raise ConfigError(f"--batch-sizes must be between 1 and 65536, got {self.batch_sizes!r}")
        return sizes

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: no CUDA device is available here")
        return self.device


def config_fields() -> list:
    return list(fields(OptimizeConfig))
