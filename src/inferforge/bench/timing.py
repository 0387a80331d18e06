"""Honest timing of a variant: warm-up, rotating real inputs, device events, medians and tail percentiles.

On a GPU every iteration is bracketed by CUDA events recorded on the stream (no sync inside the loop) and
the loop as a whole by a synchronised wall clock, so per-batch latency is device time and throughput
includes any launch gaps. On the CPU each call is synchronous and timed with perf_counter. Inputs are moved
to the device and cast before timing: these are the model's figures, not the server's (the server's come
from `inferforge loadtest`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from inferforge.models.data import EvalData
from inferforge.techniques import Variant


@dataclass(frozen=True)
class BenchConfig:
    """How long and how often to measure."""

    warmup: int = (
        5  # untimed calls per batch size after the first (which is timed apart, as compile/first-call)
    )
    min_iters: int = 20  # timed calls at least
    max_iters: int = 1000  # timed calls at most
    min_time_s: float = 1.0  # keep timing until this much wall time has passed (bounded by max_iters)
    max_time_s: float = (
        10.0  # stop after this long even before min_iters (a very slow variant), after 3 calls
    )
    rotate: int = 4  # distinct input batches cycled through, so caches cannot serve a single batch

    def __post_init__(self) -> None:
        if (
            self.warmup < 0
            or self.min_iters < 1
            or self.max_iters < self.min_iters
            or self.rotate < 1
            or (self.max_time_s < self.min_time_s)
        ):
            raise ValueError(f"bad BenchConfig {self}")


@dataclass(frozen=True)
class Timing:
    """One batch size's figures (milliseconds per batch; items per second)."""

    batch_size: int
    iters: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput: float  # items/s over the whole timed loop, wall clock
    first_call_s: float  # the first call, which includes compiling or capturing for this shape
    samples_ms: tuple[float, ...] = ()

    def to_json(self) -> dict:
        data = asdict(self)
        data.pop("samples_ms")
        return data


def rotating_batches(
    data: EvalData, batch_size: int, count: int, variant: Variant
) -> list[tuple[torch.Tensor, ...]]:
    """`count` different batches of real rows, already on the device in the variant's dtype."""
    n = len(data)
    generator = torch.Generator().manual_seed(batch_size)
    batches = []
    for _ in range(count):
        index = (
            torch.randint(0, n, (batch_size,), generator=generator)
            if batch_size > n
            else torch.randperm(n, generator=generator)[:batch_size]
        )
        batches.append(variant.prepare(data.rows(index)))
    return batches


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_batch_size(variant: Variant, data: EvalData, batch_size: int, config: BenchConfig) -> Timing:
    device = variant.device
    batches = rotating_batches(data, batch_size, config.rotate, variant)
    _sync(device)
    started = time.perf_counter()
    variant.forward_prepared(batches[0])
    _sync(device)
    first_call_s = time.perf_counter() - started
    warm_started = time.perf_counter()
    for i in range(config.warmup):
        variant.forward_prepared(batches[i % len(batches)])
        if time.perf_counter() - warm_started > config.max_time_s / 2:
            break
    _sync(device)
    samples, wall, iters = _timed_loop(variant, batches, config)
    samples_ms = np.asarray(samples)
    return Timing(
        batch_size=batch_size,
        iters=iters,
        p50_ms=float(np.percentile(samples_ms, 50)),
        p90_ms=float(np.percentile(samples_ms, 90)),
        p99_ms=float(np.percentile(samples_ms, 99)),
        mean_ms=float(samples_ms.mean()),
        min_ms=float(samples_ms.min()),
        throughput=batch_size * iters / wall,
        first_call_s=first_call_s,
        samples_ms=tuple(float(s) for s in samples_ms),
    )


def _timed_loop(variant: Variant, batches: list, config: BenchConfig) -> tuple[list[float], float, int]:
    device = variant.device
    cuda = device.type == "cuda"
    events: list[tuple] = []
    samples: list[float] = []
    iters = 0
    started = time.perf_counter()
    while iters < config.max_iters and (
        iters < config.min_iters or time.perf_counter() - started < config.min_time_s
    ):
        if iters >= 3 and time.perf_counter() - started > config.max_time_s:
            break
        batch = batches[iters % len(batches)]
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            variant.forward_prepared(batch)
            end.record()
            events.append((begin, end))
        else:
            t0 = time.perf_counter()
            variant.forward_prepared(batch)
            samples.append((time.perf_counter() - t0) * 1e3)
        iters += 1
    _sync(device)
    wall = time.perf_counter() - started
    if cuda:
        samples = [begin.elapsed_time(end) for begin, end in events]
    return samples, wall, iters
