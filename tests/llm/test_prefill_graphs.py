"""Prompt steps through `PrefillGraphs`' device layout (the path CUDA graphs replay) against the eager prompt
path. On the CPU the layout runs without capture and attends through `varlen_attention_torch`; the Triton
kernel is checked against that reference in test_triton_varlen_attn.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tests.llm.conftest import record_graph_steps

from inferforge.llm import attention
from inferforge.llm.engine import EngineConfig, LLMEngine, _useful_buckets
from inferforge.llm.prefill_graphs import PrefillGraphs
from inferforge.llm.protocol import EngineRequest, SamplingParams


def test_programs_cover_each_chunk_in_blocks_and_pad_with_minus_one() -> None:
    seq, q0 = attention.varlen_programs(np.array([1, 0, 33, 16]), 16, 10)
    assert seq.tolist() == [0, 2, 2, 2, 3, -1, -1, -1, -1, -1]
    assert q0.tolist()[:5] == [0, 0, 16, 32, 0]
    with pytest.raises(ValueError, match="exceed the capacity"):
        attention.varlen_programs(np.array([100]), 16, 6)


def test_reference_equals_causal_sdpa_for_a_fresh_prompt_and_one_decode_row() -> None:
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, bs, n = 4, 2, 8, 16, 20
    k = torch.randn(4, bs, kv_heads, d, generator=gen)
    v = torch.randn(4, bs, kv_heads, d, generator=gen)
    q = torch.randn(n + 1, heads, d, generator=gen)
    bt = torch.tensor([[2, 1], [3, 0]])
    cu, ctx = torch.tensor([0, n, n + 1]), torch.tensor([n, 5])
    got = attention.varlen_attention_torch(q, k, v, cu, ctx, bt, None, None, d**-0.5)
    keys = k[bt[0]].flatten(0, 1)[:n].repeat_interleave(2, dim=1).transpose(0, 1)
    vals = v[bt[0]].flatten(0, 1)[:n].repeat_interleave(2, dim=1).transpose(0, 1)
    want = F.scaled_dot_product_attention(q[:n].transpose(0, 1), keys, vals, is_causal=True, scale=d**-0.5)
    assert torch.allclose(got[:n], want.transpose(0, 1), atol=1e-5)
    k1 = k[3, :5].repeat_interleave(2, dim=1).transpose(0, 1)
    v1 = v[3, :5].repeat_interleave(2, dim=1).transpose(0, 1)
    want1 = F.scaled_dot_product_attention(q[n].unsqueeze(1), k1, v1, scale=d**-0.5)  # [heads, 1, d]
    assert torch.allclose(got[n], want1.squeeze(1), atol=1e-5)


def test_useful_buckets_stop_at_the_first_that_holds_the_largest_step() -> None:
    assert _useful_buckets((512, 128, 256, 1024), 300) == (128, 256, 512)
    assert _useful_buckets((128, 256), 8192) == (128, 256)


def _run(eng: LLMEngine, reqs: list[EngineRequest], arrive_every: int) -> dict[str, list[int]]:
    """Each sequence's tokens ("request/index"), requests joining one per `arrive_every` steps."""
    out: dict[str, list[int]] = {}
    pending, steps = list(reqs), 0
    while pending or eng.has_unfinished():
        if pending and steps % arrive_every == 0:
            eng.add_request(pending.pop(0))
        for o in eng.step():
            out.setdefault(f"{o.request_id}/{o.index}", []).extend(o.new_token_ids)
        steps += 1
    return out


def _with_layout(eng: LLMEngine) -> list[bool]:
    """Give `eng` prompt steps through PrefillGraphs' layout (8- and 16-token buckets, no capture); returns,
    per prompt step, whether it took the layout."""
    graphs = PrefillGraphs(
        eng.model, eng.device, max_seqs=eng.config.max_num_seqs, max_blocks=eng.runner.max_blocks,
        buckets=(8, 16), attn_fn=attention.varlen_attention_torch, capture=False,
    )  # fmt: skip
    eng.runner.prefill_graphs = graphs
    return record_graph_steps(graphs)


def test_prefix_cache_hits_and_n_forks_through_the_layout(tiny_dirs: dict[str, Path]) -> None:
    """Prompts sharing a 32-token start (their later chunks attend to cached blocks they did not compute) and
    n = 2 sampled with a seed (the fork copies the prompt's blocks) give what the eager path gives."""
    config = EngineConfig(kv_cache_tokens=4096, max_num_seqs=6, max_num_batched_tokens=24,
                          enable_prefix_caching=True)  # fmt: skip
    eager, layout = LLMEngine(tiny_dirs["llama"], config), LLMEngine(tiny_dirs["llama"], config)
    calls = _with_layout(layout)
    shared = tuple(range(40, 72))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"p{i}", shared + tuple(range(80 + i, 85 + 2 * i)), greedy) for i in range(4)]
    reqs.append(
        EngineRequest("n2", tuple(range(9, 20)), SamplingParams(max_tokens=6, n=2, seed=3, ignore_eos=True))
    )
    assert _run(layout, reqs, 3) == _run(eager, reqs, 3)
    assert sum(calls) >= 3 and layout.scheduler.cached_tokens_total > 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_graph_layout_steps_equal_the_eager_prompt_path(tiny_dirs: dict[str, Path], family: str) -> None:
    """Requests join every 2 steps under a 24-token budget with 8- and 16-token buckets: steps mix decode
    rows, fresh prompts and later chunks of long ones (a step over 16 tokens falls back to eager)."""
    config = EngineConfig(kv_cache_tokens=4096, max_num_seqs=6, max_num_batched_tokens=24)
    eager, layout = LLMEngine(tiny_dirs[family], config), LLMEngine(tiny_dirs[family], config)
    calls = _with_layout(layout)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"r{i}", tuple(range(20 + 5 * i, 23 + 11 * i)), params) for i in range(6)]
    assert _run(layout, reqs, 2) == _run(eager, reqs, 2)
    assert sum(calls) >= 3
    assert layout.stats().kv_blocks_used == 0


def test_kernel_summary_says_why_prompt_steps_are_eager_on_the_cpu(tiny_llama: Path) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=1024))
    line = eng.kernel_summary()
    assert line.startswith("device cpu, decode attention torch")
    assert "prompt steps eager (no graphs asked for or possible here)" in line
    eng.runner.prefill_graph_error = "RuntimeError: out of memory"
    assert "prompt steps eager (RuntimeError: out of memory)" in eng.kernel_summary()


def test_buckets_past_short_context_take_only_steps_of_short_chunks(tiny_llama: Path) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=1024))
    graphs = PrefillGraphs(
        eng.model, eng.device, max_seqs=4, max_blocks=eng.runner.max_blocks, buckets=(8, 16, 32),
        attn_fn=attention.varlen_attention_torch, capture=False, short_context=16,
    )  # fmt: skip
    assert graphs.bucket_for(32, 4, longest_context=12) == 32  # a burst of short prompts that fills it
    assert graphs.bucket_for(31, 4, longest_context=12) == 32  # padding within LARGE_BUCKET_PADDING
    assert graphs.bucket_for(30, 3, longest_context=12) is None  # more padding: compute-bound, eager
    assert graphs.bucket_for(32, 2, longest_context=17) is None  # a chunk ending past 16 tokens: eager
    assert graphs.bucket_for(12, 1, longest_context=40) == 16  # within short_context: any context
    assert graphs.bucket_for(33, 3, longest_context=12) is None  # over the largest bucket
    assert graphs.bucket_for(8, 5, longest_context=4) is None  # more sequences than the buffers hold


def test_short_context_rule_steps_equal_the_eager_prompt_path(tiny_dirs: dict[str, Path]) -> None:
    """Bursts of short prompts fill the 32-token bucket past short_context (16); a long prompt's chunks end
    past it and run eagerly; every sequence's tokens equal the eager engine's."""
    config = EngineConfig(kv_cache_tokens=4096, max_num_seqs=6, max_num_batched_tokens=32)
    eager, layout = LLMEngine(tiny_dirs["llama"], config), LLMEngine(tiny_dirs["llama"], config)
    graphs = PrefillGraphs(
        layout.model, layout.device, max_seqs=6, max_blocks=layout.runner.max_blocks, buckets=(8, 16, 32),
        attn_fn=attention.varlen_attention_torch, capture=False, short_context=16,
    )  # fmt: skip
    used: list[int | None] = []
    pick = graphs.bucket_for

    def recorded(tokens: int, seqs: int, longest_context: int = 0) -> int | None:
        used.append(pick(tokens, seqs, longest_context))
        return used[-1]

    graphs.bucket_for = recorded  # type: ignore[method-assign]
    layout.runner.prefill_graphs = graphs
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    burst = [EngineRequest(f"s{i}", tuple(range(30 + i, 38 + i)), params) for i in range(4)]  # 32 tokens
    long = EngineRequest("long", tuple(range(100, 140)), params)
    for eng in (eager, layout):
        for r in burst:
            eng.add_request(r)
    want, got = _run(eager, [long], 1), _run(layout, [long], 1)
    assert got == want and len(got) == 5
    assert 32 in used and None in used


def _layout_graphs(eng: LLMEngine, buckets: tuple[int, ...], short_context: int) -> PrefillGraphs:
    return PrefillGraphs(
        eng.model, eng.device, max_seqs=eng.config.max_num_seqs, max_blocks=eng.runner.max_blocks,
        buckets=buckets, attn_fn=attention.varlen_attention_torch, capture=False, short_context=short_context,
    )  # fmt: skip


def test_graph_tokens_cut_a_step_to_the_largest_bucket_below(tiny_llama: Path) -> None:
    eng = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=1024, max_num_seqs=4))
    graphs = _layout_graphs(eng, (8, 16, 32), short_context=16)
    assert graphs.graph_tokens(32, 4, longest_context=12) == 32  # fits: unchanged
    assert graphs.graph_tokens(31, 4, longest_context=12) == 31  # within the padding rule: unchanged
    assert graphs.graph_tokens(30, 3, longest_context=12) == 16  # fits no bucket: the largest below
    assert graphs.graph_tokens(40, 3, longest_context=12) == 32  # over the largest bucket
    assert graphs.graph_tokens(30, 2, longest_context=17) == 30  # a long prompt's chunk: eager, uncut
    assert graphs.graph_tokens(8, 5, longest_context=4) == 8  # more sequences than the graphs hold


@pytest.mark.parametrize("align", [True, False])
def test_aligned_prompt_steps_all_take_a_bucket_and_equal_the_eager_path(
    tiny_dirs: dict[str, Path], align: bool
) -> None:
    """Bursts of three 9-10-token prompts (28-30 tokens: no bucket of 8, 16, 32 within the padding rule)
    are cut to 16-token steps, which leaves a request admitted with no chunk in its first step; every step
    then takes a bucket, and every sequence's tokens equal those of the eager engine. Without the cut the
    bursts run eagerly."""
    config = EngineConfig(kv_cache_tokens=4096, max_num_seqs=6, max_num_batched_tokens=32,
                          align_prompt_steps=align)  # fmt: skip
    eager, layout = LLMEngine(tiny_dirs["llama"], config), LLMEngine(tiny_dirs["llama"], config)
    graphs = _layout_graphs(layout, (8, 16, 32), short_context=16)
    took_graph = record_graph_steps(graphs)  # per prompt step
    layout.runner.prefill_graphs = graphs
    layout.fit_prompt_steps_to_graphs()
    waiting_in_running: list[int] = []  # per step: admitted requests left out of the step's chunks
    schedule = layout.scheduler.schedule

    def watched():
        plan = schedule()
        planned = {id(seq.group) for seq, _ in plan.prefill}
        waiting_in_running.append(
            sum(1 for r in layout.scheduler.running if not r.prefilled and id(r) not in planned)
        )
        return plan

    layout.scheduler.schedule = watched  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    reqs = [EngineRequest(f"b{i}", tuple(range(30 + 3 * i, 39 + 3 * i + i % 2)), params) for i in range(6)]
    out = {}
    for eng in (layout, eager):
        got: dict[str, list[int]] = {}
        for burst in (reqs[:3], reqs[3:]):
            for r in burst:
                eng.add_request(r)
            for _ in range(3):
                for o in eng.step():
                    got.setdefault(o.request_id, []).extend(o.new_token_ids)
        while eng.has_unfinished():
            for o in eng.step():
                got.setdefault(o.request_id, []).extend(o.new_token_ids)
        out[eng is layout] = got
    assert out[True] == out[False]
    assert all(len(v) == 5 for v in out[True].values())
    if align:
        assert layout.scheduler.step_tokens is not None
        assert took_graph and all(took_graph)
        assert max(waiting_in_running) >= 1
    else:
        assert layout.scheduler.step_tokens is None
        assert not all(took_graph)
