"""The messages that cross into and out of the engine, and the batcher's configuration."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from inferforge.registry.servable import BatchingHints


@dataclass(frozen=True)
class BatcherConfig:
    """How one model version's requests are queued, grouped into batches and run."""

    max_batch_size: int = 64
    """Most rows (summed over requests) in one call to `predict`."""
    max_queue_delay_us: int = 0
    """How long the oldest request may wait for others to join its batch; 0: batch what is queued."""
    preferred_batch_sizes: tuple[int, ...] = ()
    """Sizes at which a batch stops waiting out the queue delay (e.g. sizes the model is tuned for)."""
    pad_batch_sizes: tuple[int, ...] = ()
    """When set, every batch is padded up to the smallest of these sizes (CUDA graphs captured at them)."""
    max_queue_size: int = 512
    """Most requests waiting per model version; past it requests are refused with a retry hint, not queued."""
    timeout_s: float = 30.0
    """Deadline of a request that sets none of its own."""
    instances: int = 1
    """Model instances (each with its own worker thread) per model version and device."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_queue_delay_us < 0:
            raise ValueError(f"max_queue_delay_us must be >= 0, got {self.max_queue_delay_us}")
        if self.max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {self.max_queue_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        for label, sizes in (
            ("preferred_batch_sizes", self.preferred_batch_sizes),
            ("pad_batch_sizes", self.pad_batch_sizes),
        ):
            bad = [s for s in sizes if not 1 <= s <= self.max_batch_size]
            if bad:
                raise ValueError(f"{label} {bad} must lie in 1..max_batch_size ({self.max_batch_size})")
        if self.pad_batch_sizes and max(self.pad_batch_sizes) != self.max_batch_size:
            raise ValueError(
                f"pad_batch_sizes {self.pad_batch_sizes} must include max_batch_size ({self.max_batch_size}) "
                "so that every batch has a size to pad to"
            )

    @classmethod
    def from_hints(cls, hints: BatchingHints, **overrides: object) -> BatcherConfig:
        """Start from what the artifact knows (sizes it was tuned or captured at); the server's flags win."""
        # The hints' preferred sizes are where the artifact was timed, not a batching rule: a preferred
        # size of 1 would close every batch at once. They matter only as CUDA-graph capture sizes (padding).
        base: dict[str, object] = {"max_batch_size": hints.max_batch_size}
        if hints.pad_to_batch_sizes and hints.batch_sizes:
            base["pad_batch_sizes"] = tuple(sorted(hints.batch_sizes))
            base["max_batch_size"] = max(hints.batch_sizes)
        base.update({k: v for k, v in overrides.items() if v is not None})
        if "max_batch_size" in overrides and overrides["max_batch_size"] is not None:
            cap = int(overrides["max_batch_size"])  # type: ignore[call-overload]
            for key in ("preferred_batch_sizes", "pad_batch_sizes"):
                sizes = tuple(s for s in base.get(key, ()) if s <= cap)  # type: ignore[attr-defined]
                if key == "pad_batch_sizes" and sizes and max(sizes) != cap:
                    sizes = (*sizes, cap)
                base[key] = sizes
        return cls(**base)  # type: ignore[arg-type]


@dataclass
class InferRequest:
    """One client request: named input arrays with the batch on dim 0, the outputs wanted, and a deadline."""

    id: str
    inputs: dict[str, np.ndarray]
    outputs: tuple[str, ...] | None = None  # None: every output the model declares
    deadline: float | None = None  # time.monotonic() by which it must be answered
    arrival: float = field(default_factory=time.monotonic)

    @property
    def rows(self) -> int:
        return int(next(iter(self.inputs.values())).shape[0]) if self.inputs else 0


@dataclass(frozen=True)
class InferResponse:
    """The outputs of one request, split back from its batch, with where its time went."""

    id: str
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    queue_s: float
    compute_s: float
    batch_size: int
