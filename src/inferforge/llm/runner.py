"""Runs a scheduled step on the model: decodes through CUDA graphs on a GPU, prompt steps through graphs per
token bucket where they fit (`prefill_graphs.py`) and eagerly otherwise.

Decode graphs are captured once per batch bucket (1, 2, 4, ... max_num_seqs) over static input buffers; a step
copies its inputs from one pinned host buffer in a single transfer, pads to the bucket (padded rows write into
the reserved block 0) and replays. Weights and the KV cache are module state, so a replay copies nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from inferforge.llm.attention import AttnMeta, PrefillSeq, fresh_groups, late_tile
from inferforge.llm.cuda_graphs import capture_per_bucket
from inferforge.llm.kv_cache import BLOCK_SIZE, blocks_needed, slot_of
from inferforge.llm.model import DecoderLM
from inferforge.llm.prefill_graphs import PrefillGraphs
from inferforge.llm.sampler import to_device
from inferforge.llm.scheduler import Sequence


def buckets_up_to(n: int) -> list[int]:
    out = [1]
    while out[-1] < n:
        out.append(min(out[-1] * 2, n))
    return out


def _chunk_positions_and_slots(chunks: list[tuple[Sequence, int]]) -> np.ndarray:
    """[2, T]: positions and cache slots of every token of the prompt chunks, in a few numpy calls for all
    chunks (per chunk, numpy's call overhead made 64 chunks cost 0.37 ms on the CPU box)."""
    starts = np.fromiter((s.num_computed for s, _ in chunks), np.int64, len(chunks))
    lengths = np.fromiter((n for _, n in chunks), np.int64, len(chunks))
    owner = np.repeat(np.arange(len(chunks)), lengths)
    total = int(lengths.sum())
    pos = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths - starts, lengths)
    last = (starts + lengths - 1) // BLOCK_SIZE + 1  # blocks each chunk reaches into
    table = np.zeros((len(chunks), int(last.max(initial=1))), dtype=np.int64)
    for i, (seq, _) in enumerate(chunks):
        table[i, : last[i]] = seq.blocks[: last[i]]
    out = np.empty((2, total), dtype=np.int64)
    out[0] = pos
    out[1] = table[owner, pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    return out


class ModelRunner:
    def __init__(
        self,
        model: DecoderLM,
        device: torch.device,
        *,
        max_num_seqs: int,
        max_model_len: int,
        cuda_graphs: bool,
        decode_fn: Callable[..., torch.Tensor] | None = None,
        buckets: tuple[int, ...] | None = None,
        varlen_fn: Callable[..., torch.Tensor] | None = None,
        prefill_buckets: tuple[int, ...] = (),
    ) -> None:
        self.model, self.device, self.decode_fn = model, device, decode_fn
        self.max_blocks = blocks_needed(max_model_len)
        self.buckets = sorted(set(buckets) | {max_num_seqs}) if buckets else buckets_up_to(max_num_seqs)
        b = self.buckets[-1]
        self._width = 4 * b + b * self.max_blocks
        on_gpu = device.type == "cuda"
        # Two pinned staging buffers, used in turn: with overlapped decode the host fills step k+1's inputs
        # while step k's copy out of the other buffer may not have run yet.
        self._hosts = [torch.zeros(self._width, dtype=torch.long, pin_memory=on_gpu) for _ in "ab"]
        self._tables: list[list[list[int]]] = [[[] for _ in range(b)] for _ in "ab"]  # rows as written
        self._turn = 0
        self._dev = torch.zeros(self._width, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.verify_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.compile_error: str | None = None
        if cuda_graphs and on_gpu:
            self.capture()
        self.prefill_graphs: PrefillGraphs | None = None
        self.prefill_graph_error: str | None = None
        if cuda_graphs and on_gpu and varlen_fn is not None and prefill_buckets:
            self._capture_prefill(varlen_fn, prefill_buckets, max_num_seqs)

    def _capture_prefill(self, fn: Callable[..., torch.Tensor], buckets: tuple[int, ...], seqs: int) -> None:
        """Graphs of prompt steps; a failure to capture leaves prompt steps eager (and says why)."""
        try:
            self.prefill_graphs = PrefillGraphs(
                self.model, self.device, max_seqs=seqs, max_blocks=self.max_blocks, buckets=buckets,
                attn_fn=fn, capture=True,
            )  # fmt: skip
        except Exception as exc:
            self.prefill_graphs = None
            self.prefill_graph_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            torch.cuda.synchronize()

    def _views(self, b: int) -> tuple[torch.Tensor, ...]:
        """ids, positions, slots, context_lens, block_tables for the first b rows of the static buffer."""
        n = self.buckets[-1]
        d = self._dev
        bt = d[4 * n :].view(n, self.max_blocks)[:b]
        return d[:b], d[n : n + b], d[2 * n : 2 * n + b], d[3 * n : 3 * n + b], bt

    def _decode_forward(self, b: int) -> torch.Tensor:
        ids, pos, slots, ctx, bt = self._views(b)
        meta = AttnMeta(slot_mapping=slots, block_tables=bt, context_lens=ctx, decode_fn=self.decode_fn)
        return self.model.decode_logits(ids, pos, meta)

    def capture(self) -> None:
        """Capture every bucket; if the compiled decode block fails to build, fall back to eager kernels."""
        try:
            self._capture()
        except Exception as exc:
            if self.model.compiled_block is None:
                raise
            self.model.compiled_block = None
            self.compile_error = f"{type(exc).__name__}: {str(exc)[:300]}"
            self.graphs.clear()
            torch.cuda.synchronize()
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool."""
        self._fill([], self.buckets[-1], None)
        self.graphs.update(capture_per_bucket(self.buckets, self._decode_forward))

    def _fill(self, seqs: list[Sequence], b: int, ahead: list[bool] | None) -> None:
        """Write the decode inputs into the pinned buffer (pad rows point at block 0) and send it in one
        copy. `ahead[i]`: row i's newest token is still on the device (sampled by the step in flight), so
        its position moves one further and the caller supplies its id on the device."""
        pos = [len(s.token_ids) - 1 + (1 if ahead and ahead[i] else 0) for i, s in enumerate(seqs)]
        self._fill_rows(seqs, [s.token_ids[-1] for s in seqs], pos, b)

    def _fill_rows(self, seqs: list[Sequence], ids: list[int], pos: list[int], b: int) -> None:
        """`_fill` for rows given as (sequence, token, position): a sequence may take several rows."""
        self._turn ^= 1
        host = self._hosts[self._turn]
        n, h = self.buckets[-1], host.numpy()
        h[: 4 * n] = 0
        h[3 * n : 4 * n] = 1  # padded rows attend to one (scratch) slot
        bt = h[4 * n :].reshape(n, self.max_blocks)
        k = len(seqs)
        h[:k] = ids  # a slice at a time: per-element numpy writes cost ~4x
        h[n : n + k] = pos
        h[2 * n : 2 * n + k] = [slot_of(s.blocks, p) for s, p in zip(seqs, pos, strict=True)]
        h[3 * n : 3 * n + k] = [p + 1 for p in pos]
        # Block-table rows change only when a row's sequence (or its blocks) does: rewriting 64 unchanged rows
        # a step was ~100 us of host work. Rows past the batch are zero (they attend block 0).
        written = self._tables[self._turn]
        for i in range(b):
            blocks = seqs[i].blocks if i < k else []
            if written[i] != blocks:
                bt[i] = 0
                bt[i, : len(blocks)] = blocks
                written[i] = list(blocks)
        # Only the bucket's table rows: the whole buffer is 64 x max_blocks longs, 4 MB at a 131,072 context.
        end = 4 * n + b * self.max_blocks
        self._dev[:end].copy_(host[:end], non_blocking=True)

    @torch.inference_mode()
    def decode(
        self,
        seqs: list[Sequence],
        ahead: list[bool] | None = None,
        carry_rows: torch.Tensor | None = None,
        carry_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [len(seqs), vocab] for the next token of each decoding sequence. Rows marked in `ahead`
        take their input token from `carry_ids` (device), written to rows `carry_rows` (None: rows 0..k-1)."""
        b = next((x for x in self.buckets if x >= len(seqs)), None)
        if b is None:
            raise RuntimeError(f"{len(seqs)} decoding sequences exceed the largest bucket {self.buckets[-1]}")
        if b in self.graphs:
            self._fill(seqs, b, ahead)
            self._carry(carry_rows, carry_ids)
            graph, out = self.graphs[b]
            graph.replay()
            return out[: len(seqs)]
        self._fill(seqs, len(seqs), ahead)
        self._carry(carry_rows, carry_ids)
        return self._decode_forward(len(seqs))

    @torch.inference_mode()
    def verify(self, rows: list[tuple[Sequence, int, int]]) -> torch.Tensor:
        """Logits [len(rows), vocab] for decode rows given as (sequence, token, position): a sequence's last
        token and its drafts at successive positions, each attending to the keys the rows before it write
        in the same step (speculative verification). Runs as a decode step (batch-1 GEMVs for one row,
        cuBLAS above), replayed from graphs captured with the attention's first tile read after its wait
        (`attention.late_tile`), or eagerly under it."""
        b = next((x for x in self.buckets if x >= len(rows)), None)
        if b is None:
            raise RuntimeError(f"{len(rows)} verification rows exceed the largest bucket {self.buckets[-1]}")
        graphed = b in self.verify_graphs
        seqs, ids, pos = [s for s, _, _ in rows], [t for _, t, _ in rows], [p for _, _, p in rows]
        self._fill_rows(seqs, ids, pos, b if graphed else len(rows))
        if graphed:
            graph, out = self.verify_graphs[b]
            graph.replay()
            return out[: len(rows)]
        with late_tile():
            return self._decode_forward(len(rows))

    def capture_verify(self, max_rows: int) -> None:
        """Graphs of verification steps up to `max_rows` rows (their own pool beside the decode graphs')."""
        if not self.graphs:  # no decode graphs (CPU, or graphs off): verification runs eagerly too
            return
        buckets = [x for x in self.buckets if x < max_rows] + [x for x in self.buckets if x >= max_rows][:1]
        self._fill([], self.buckets[-1], None)
        with late_tile():
            self.verify_graphs = capture_per_bucket(buckets, self._decode_forward)

    def _carry(self, rows: torch.Tensor | None, ids: torch.Tensor | None) -> None:
        if ids is None:
            return
        if rows is None:
            self._dev[: ids.shape[0]].copy_(ids)
        else:
            self._dev.index_copy_(0, rows, ids)

    @torch.inference_mode()
    def prefill(
        self,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence] | None = None,
        ahead: list[bool] | None = None,
        carry_rows: torch.Tensor | None = None,
        carry_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[Sequence], torch.Tensor]:
        """Compute prompt chunks; returns logits for the sequences whose prompt is now complete, those
        sequences, and the step's hidden states (decode rows first, then the chunks' tokens in order).

        With `decode` rows (and their carried ids, as in `decode`), one eager pass computes them first and
        then the chunks, and the logits start with one row per decoding sequence: a step that ran the decode
        graph and then a separate prefill read every weight twice, and with requests arriving continuously
        nearly every step is such a step."""
        decode = decode or []
        positions = [len(s.token_ids) - 1 + (1 if ahead and ahead[i] else 0) for i, s in enumerate(decode)]
        layout = _chunk_positions_and_slots(chunks)
        rows: list[int] = list(range(len(decode)))
        done: list[Sequence] = []
        end = len(decode)
        for seq, n in chunks:
            end += n
            if seq.num_computed + n >= len(seq.token_ids):
                rows.append(end - 1)
                done.append(seq)
        hidden = None
        if self.prefill_graphs is not None:
            hidden = self.prefill_graphs.run(chunks, decode, positions, layout, carry_rows, carry_ids)
        if hidden is None:
            hidden = self._prefill_eager(chunks, decode, positions, layout, carry_rows, carry_ids)
        if not rows:
            return hidden.new_empty(0, self.model.cfg.vocab_size, dtype=torch.float32), done, hidden
        return self.model.logits(hidden[to_device(rows, self.device, torch.long)]), done, hidden

    def _prefill_eager(
        self,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence],
        positions: list[int],
        layout: np.ndarray,
        carry_rows: torch.Tensor | None,
        carry_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """The step's hidden states through eager kernels, its prompts' attention grouped on the host."""
        ids = [s.token_ids[-1] for s in decode]
        tables = [s.blocks + [0] * (self.max_blocks - len(s.blocks)) for s in decode]
        metas: list[PrefillSeq] = []
        for seq, n in chunks:
            start, end = seq.num_computed, seq.num_computed + n
            q_start = len(ids)
            ids.extend(seq.token_ids[start:end])
            fresh = start == 0
            block_ids = (
                None if fresh else to_device(seq.blocks[: blocks_needed(end)], self.device, torch.long)
            )
            metas.append(PrefillSeq(q_start, n, end, block_ids))
        # One [3, T] array, one host-to-device copy: 3 x 8,192 Python ints through `np.array` of lists took
        # 0.58 ms of the 1.3 ms before a 64 x 128-token prefill's first kernel (CPU box); now ids only.
        flat = np.empty((3, len(ids)), dtype=np.int64)
        flat[0] = ids
        d = len(decode)
        flat[1, :d] = positions
        flat[2, :d] = [slot_of(s.blocks, p) for s, p in zip(decode, positions, strict=True)]
        flat[1:, d:] = layout
        dev = to_device(flat, self.device, torch.long)
        if carry_ids is not None:
            if carry_rows is None:
                dev[0, : carry_ids.shape[0]] = carry_ids
            else:
                dev[0].index_copy_(0, carry_rows, carry_ids)
        groups, alone = fresh_groups(metas, self.device)
        meta = AttnMeta(slot_mapping=dev[2], prefill=alone, fresh_groups=groups, num_decode=len(decode))
        if decode:
            meta.block_tables = to_device(tables, self.device, torch.long)
            meta.context_lens = to_device([p + 1 for p in positions], self.device, torch.long)
            meta.decode_fn = self.decode_fn
        return self.model(dev[0], dev[1], meta)
