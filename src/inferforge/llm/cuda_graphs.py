"""Capturing one CUDA graph per bucket, shared by the decode steps (`runner`) and the prompt steps
(`prefill_graphs`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


@torch.inference_mode()
def capture_per_bucket(
    buckets: Iterable[int], forward: Callable[[int], torch.Tensor]
) -> dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]]:
    """One graph per bucket, largest first so the others fit in its memory pool, which they all share; each
    bucket's `forward` runs twice on a side stream before its capture (allocator and kernel warm-up). The
    caller has filled its static inputs."""
    graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
    torch.cuda.synchronize()
    pool = None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for bucket in sorted(buckets, reverse=True):
            for _ in range(2):
                forward(bucket)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                out = forward(bucket)
            pool = graph.pool()
            graphs[bucket] = (graph, out)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return graphs
