"""The Triton paged-decode kernel against the torch reference (gathers the block table), on CUDA or in
Triton's interpreter on the CPU where Triton is installed (CI's CPU environment has none: skipped there).

Split-KV: in the interpreter `num_splits` splits as on an H100 (132 SMs), and the tests lower
MIN_SPLIT_TOKENS so that contexts of a few hundred tokens run several splits."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from inferforge.llm import attention, triton_attn

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.float32 if DEVICE.type == "cpu" else torch.bfloat16
TOL = 1e-5 if DEVICE.type == "cpu" else 2e-2


@pytest.fixture
def fresh_scratch(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty scratch cache, so a test sees exactly the split-KV buffers its own calls made."""
    cache: dict = {}
    monkeypatch.setattr(triton_attn, "_SCRATCH", cache)
    return cache


@pytest.mark.parametrize("tile", [16, 64, 128])
def test_kernel_matches_the_reference_for_every_tile(tile: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Contexts of 1 to 1,024 tokens over shuffled blocks at the default split knobs (300 tokens and more run
    several splits): the first tile of each split is read before the wait without the newest token, which is
    patched in after it; later tiles are read in the loop."""
    for key in ("small_batch", "large_batch"):
        monkeypatch.setitem(triton_attn.TILE, key, tile)
    assert triton_attn.check_against_reference(DEVICE, DTYPE) < TOL


@pytest.mark.parametrize(
    ("max_splits", "min_tokens", "prefetch"),
    [
        (1, 16, True),  # split-KV off: one program per (sequence, KV head), the direct path
        (3, 16, True),  # every long context wants more splits than the grid has
        (16, 16, True),  # as many splits as the contexts fill, fewer than the grid's for the short ones
        (16, 16, False),  # the same without the block-table prefetch
        (16, 4096, True),  # every context shorter than one split: the grid's extra programs all return
    ],
)
def test_every_split_path_matches_the_reference(
    max_splits: int, min_tokens: int, prefetch: bool, fresh_scratch: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ragged lengths in one batch (1 and 17 tokens stay whole while 300 to 777 split), fp32 exact; partials
    were written (the scratch starts as NaN) exactly when a context was split; every counter is back at 0."""
    monkeypatch.setattr(triton_attn, "MAX_SPLITS", max_splits)
    monkeypatch.setattr(triton_attn, "MIN_SPLIT_TOKENS", min_tokens)
    monkeypatch.setattr(triton_attn, "PREFETCH_TABLE", prefetch)
    monkeypatch.setitem(triton_attn.TILE, "small_batch", 64)  # splits are whole tiles: 64 lets 300 split in 5
    contexts = (1, 17, 300, 777)
    assert triton_attn.check_against_reference(DEVICE, DTYPE, contexts) < TOL
    merged = any(not partials.isnan().all() for _, partials, _ in fresh_scratch.values())
    assert merged == (max_splits > 1 and min_tokens < max(contexts))
    for _, _, counters in fresh_scratch.values():
        assert counters.count_nonzero().item() == 0


def _paged_case(gen: torch.Generator, contexts: tuple[int, ...], n_blocks: int = 64, table_blocks: int = 0):
    b, heads, kv_heads, d, bs = len(contexts), 8, 2, 32, 16
    max_blocks = table_blocks or -(-max(contexts) // bs)
    k = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(n_blocks, bs, kv_heads, d, generator=gen).to(DEVICE, DTYPE)
    q = torch.randn(b, heads, d, generator=gen).to(DEVICE, DTYPE)
    bt = torch.randperm(n_blocks - 1, generator=gen)[: b * max_blocks].add(1).view(b, max_blocks)
    return q, k, v, bt.to(DEVICE), torch.tensor(contexts, device=DEVICE)


def test_repeated_calls_reuse_the_counters(fresh_scratch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Three calls of one shape share one scratch set; new queries, keys and lengths each time still match
    the reference, which they cannot unless the merging program put every counter back to zero."""
    monkeypatch.setattr(triton_attn, "MIN_SPLIT_TOKENS", 16)
    monkeypatch.setitem(triton_attn.TILE, "small_batch", 16)
    gen = torch.Generator(device="cpu").manual_seed(1)
    for contexts in ((200, 9, 130), (64, 250, 17), (250, 250, 250)):
        q, k, v, bt, ctx = _paged_case(gen, contexts, table_blocks=16)  # one table width: one split count
        ref = attention.decode_attention_torch(q, k, v, bt, ctx, 0.2)
        got = triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
        assert (ref.float() - got.float()).abs().max().item() < TOL
    assert len(fresh_scratch) == 1
    (_, partials, counters), *_ = fresh_scratch.values()
    assert not partials.isnan().all()  # the long contexts were split
    assert counters.count_nonzero().item() == 0


def test_large_batches_split_by_their_own_knobs(fresh_scratch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches over 4 split by LARGE_BATCH_SPLIT (more grid waves, shorter splits) and still match the
    reference; at the default two waves the same batch stays unsplit (no partials written)."""
    monkeypatch.setitem(triton_attn.TILE, "large_batch", 16)
    gen = torch.Generator(device="cpu").manual_seed(2)
    contexts = (40, 200, 9, 130, 64, 250, 17, 100)
    for waves, tokens, split in ((2, 0, False), (200, 32, True)):
        fresh_scratch.clear()
        monkeypatch.setitem(triton_attn.LARGE_BATCH_SPLIT, "waves", waves)
        monkeypatch.setitem(triton_attn.LARGE_BATCH_SPLIT, "min_tokens", tokens)
        q, k, v, bt, ctx = _paged_case(gen, contexts, n_blocks=160, table_blocks=16)
        ref = attention.decode_attention_torch(q, k, v, bt, ctx, 0.2)
        got = triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
        assert (ref.float() - got.float()).abs().max().item() < TOL
        assert any(not p.isnan().all() for _, p, _ in fresh_scratch.values()) == split
        assert all(c.count_nonzero().item() == 0 for _, _, c in fresh_scratch.values())


def test_split_count_covers_the_gpu_and_respects_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small batches get enough programs for about two waves of SMs, capped by MAX_SPLITS; large batches
    fill the GPU alone and keep one program per (sequence, KV head)."""
    sms = (
        triton_attn._SMS_OFF_GPU
        if DEVICE.type == "cpu"
        else torch.cuda.get_device_properties(0).multi_processor_count
    )
    monkeypatch.setattr(triton_attn, "MAX_SPLITS", 10_000)
    for batch in (1, 2, 3, 8):
        splits = triton_attn.num_splits(batch, 8, DEVICE)
        assert batch * 8 * splits >= 2 * sms > batch * 8 * (splits - 1)
    monkeypatch.setattr(triton_attn, "MAX_SPLITS", 4)
    assert triton_attn.num_splits(1, 8, DEVICE) == 4
    assert triton_attn.num_splits(4 * sms, 8, DEVICE) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_graph_replays_with_new_lengths_match_the_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """As the engine runs it: one eager call (allocates the scratch), capture, then replays whose context
    lengths and queries change in place; every replay matches the reference."""
    monkeypatch.setattr(triton_attn, "MIN_SPLIT_TOKENS", 32)
    monkeypatch.setitem(triton_attn.TILE, "small_batch", 32)
    gen = torch.Generator(device="cpu").manual_seed(2)
    q, k, v, bt, ctx = _paged_case(gen, (500, 3, 333), n_blocks=128)
    triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
    for contexts in ((500, 3, 333), (1, 480, 77), (512, 512, 512)):
        ctx.copy_(torch.tensor(contexts))
        q.copy_(torch.randn(q.shape, generator=gen))
        graph.replay()
        ref = attention.decode_attention_torch(q, k, v, bt, ctx, 0.2)
        assert (ref.float() - out.float()).abs().max().item() < TOL


def test_no_more_splits_than_the_table_can_fill(fresh_scratch: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """A table of 16 blocks (256 tokens) fills one split of 256 tokens: batch 1 launches one program per KV
    head and allocates no scratch, however many splits the GPU's size would allow; at 64-token splits it
    takes four."""
    gen = torch.Generator(device="cpu").manual_seed(2)
    q, k, v, bt, ctx = _paged_case(gen, (250,), table_blocks=16)
    ref = attention.decode_attention_torch(q, k, v, bt, ctx, 0.2)
    got = triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
    assert (ref.float() - got.float()).abs().max().item() < TOL
    assert fresh_scratch == {}
    monkeypatch.setattr(triton_attn, "MIN_SPLIT_TOKENS", 64)
    monkeypatch.setitem(triton_attn.TILE, "small_batch", 16)
    got = triton_attn.paged_decode_attention(q, k, v, bt, ctx, 0.2)
    assert (ref.float() - got.float()).abs().max().item() < TOL
    assert [key[3] for key in fresh_scratch] == [4]  # (device, b, kv, splits, gp, d)
