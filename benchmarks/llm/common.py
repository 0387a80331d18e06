"""Helpers shared by the LLM benchmarks: model folders, timing, JSON output."""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path

import torch

LLAMA_1B = dict(  # the Llama-3.2-1B shape
    hidden_size=2048,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    intermediate_size=8192,
    vocab_size=128256,
    tie_word_embeddings=True,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_parameters={
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    bos_token_id=0,
    eos_token_id=0,
)


def out_dir() -> Path:
    p = Path(os.environ.get("OUT", "/tmp/inferforge_bench"))
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_json(name: str, data: dict) -> None:
    (out_dir() / name).write_text(json.dumps(data, indent=2, default=str))


def make_random_1b(folder: Path) -> Path:
    """A random-weight Llama-3.2-1B-shaped folder (bf16 safetensors) with the tiny stdlib tokenizer."""
    import transformers

    from inferforge.llm.tiny import train_tokenizer

    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    cfg = transformers.LlamaConfig(**LLAMA_1B)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    torch.manual_seed(0)
    for p in model.parameters():
        if p.dim() == 2:
            p.data.normal_(0, 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    train_tokenizer(folder)
    del model
    free()
    return folder


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def capture_graph(calls: list) -> torch.cuda.CUDAGraph:  # type: ignore[type-arg]
    """The calls run once (warm-up: compilation, autotuning), then captured in order in one CUDA graph."""
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return graph


def replays_us(graph: torch.cuda.CUDAGraph, reps: int) -> float:
    """us per replay: `reps` replays back to back between two events (no sync between them)."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def graph_us(calls: list, reps: int = 20) -> float:  # type: ignore[type-arg]
    """us per call: the calls captured in one graph, replayed `reps` times between events."""
    graph = capture_graph(calls)
    graph.replay()
    torch.cuda.synchronize()
    times = [replays_us(graph, reps) / len(calls) for _ in range(5)]
    del graph
    return sorted(times)[2]


def cuda_time(fn, iters: int = 20, warmup: int = 3) -> float:
    """Median seconds per call, CUDA events around each call after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


def replay_us(graph: torch.cuda.CUDAGraph, per: int, warmup: int = 3, replays: int = 30) -> float:
    """Median device time of one graph replay over `replays` (CUDA events around each), divided by `per`
    (the calls or layers the graph holds), in us."""
    for _ in range(warmup):
        graph.replay()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / per)
    return sorted(times)[len(times) // 2]
