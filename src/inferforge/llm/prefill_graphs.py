"""Prompt steps (prompt chunks, with or without decode rows riding along) replayed from CUDA graphs.

An eager prompt step launches ~10 kernels a layer from Python plus the host-side grouping of its attention:
~12 ms of host time for a step of one 128-token prompt and 63 decode rows whose kernels take ~2 ms (I9 trace,
2026-11-23). A server whose requests arrive a few at a time runs many such steps. Here the step's tokens are
padded to a bucket (128 ... 2,048 tokens), its layout goes to the device in one copy of one pinned buffer, and
the bucket's graph replays the whole forward; attention is `triton_varlen_attn`, which reads the layout from
the device. Padded tokens write their keys into the reserved block 0 and attend to nothing; their rows are
never read.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from inferforge.llm.attention import AttnMeta, VarlenMeta, varlen_block_q, varlen_programs
from inferforge.llm.cuda_graphs import capture_per_bucket
from inferforge.llm.kv_cache import blocks_needed, slot_of
from inferforge.llm.model import DecoderLM
from inferforge.llm.scheduler import Sequence

# The most padding (a share of the bucket) a step may take in a bucket over `short_context` tokens. Such steps
# are compute-bound and padded tokens are computed like real ones, while the graph saves only the launches:
# ~1 ms of an 8,192-token step's ~29 ms (R9 of 2026-11-24: first tokens after 28.1 ms against 28.9-29.5).
# So a 2,100-token step stays eager rather than computing 4,096, and a burst that fills 8,192 replays.
LARGE_BUCKET_PADDING = 1 / 32


class PrefillGraphs:
    """Static buffers sized for the largest bucket, one graph per bucket (captured largest first, sharing a
    memory pool); `run` fills the buffers for a step and replays, or returns None when the step does not fit.

    With `capture=False` the same layout runs eagerly (on CPU through the torch reference): what the tests
    use to check the layout against the eager prompt path."""

    def __init__(
        self,
        model: DecoderLM,
        device: torch.device,
        *,
        max_seqs: int,
        max_blocks: int,
        buckets: tuple[int, ...],
        attn_fn: Callable[..., torch.Tensor],
        capture: bool,
        short_context: int = 2048,
    ) -> None:
        self.model, self.device, self.attn_fn = model, device, attn_fn
        self.short_context = short_context
        self.bq = varlen_block_q(model.cfg.num_heads, model.cfg.num_kv_heads)  # queries per program
        self.buckets = sorted(buckets)
        self.max_seqs, self.max_blocks = max_seqs, max_blocks
        t, s = self.buckets[-1], max_seqs
        self.max_programs = t // self.bq + s
        sizes = {"ids": t, "pos": t, "slots": t, "cu_q": s + 1, "ctx": s, "prog_seq": self.max_programs,
                 "prog_q0": self.max_programs, "bt": s * max_blocks}  # fmt: skip
        self._at: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, n in sizes.items():
            self._at[name] = (offset, offset + n)
            offset += n
        pinned = device.type == "cuda"
        self._hosts = [torch.zeros(offset, dtype=torch.long, pin_memory=pinned) for _ in "ab"]
        self._turn = 0
        self._dev = torch.zeros(offset, dtype=torch.long, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        if capture:
            self._capture()

    def _view(self, buf: torch.Tensor, name: str) -> torch.Tensor:
        a, b = self._at[name]
        return buf[a:b]

    def _forward(self, bucket: int) -> torch.Tensor:
        """The final hidden states of a padded step of `bucket` tokens, from the device buffer's layout."""
        d = self._dev
        prog = self.max_programs if bucket == self.buckets[-1] else bucket // self.bq + self.max_seqs
        meta = AttnMeta(
            slot_mapping=self._view(d, "slots")[:bucket],
            varlen=VarlenMeta(
                self._view(d, "cu_q"), self._view(d, "ctx"),
                self._view(d, "bt").view(self.max_seqs, self.max_blocks),
                self._view(d, "prog_seq")[:prog], self._view(d, "prog_q0")[:prog], self.attn_fn,
            ),
        )  # fmt: skip
        return self.model(self._view(d, "ids")[:bucket], self._view(d, "pos")[:bucket], meta)

    @torch.inference_mode()
    def _capture(self) -> None:
        self._view(self._dev, "prog_seq").fill_(-1)  # a warm-up step with no programs: nothing attends
        self.graphs.update(capture_per_bucket(self.buckets, self._forward))

    def bucket_for(self, tokens: int, seqs: int, longest_context: int = 0) -> int | None:
        """The smallest bucket that holds the step, or None (eager). Buckets over `short_context` tokens take
        only steps whose chunks each end within `short_context` tokens (bursts of short prompts): the varlen
        kernel gives each 16 queries one program that scans every earlier key, so a long prompt ran slower
        through a graph than through the eager path's flash SDPA (J5: 3,072 tokens 16.3 against 15.9 ms,
        4,000 tokens 22.3 against 20.9), and only steps that fill the bucket to within
        `LARGE_BUCKET_PADDING`."""
        if seqs > self.max_seqs:
            return None
        bucket = next((b for b in self.buckets if b >= tokens), None)
        large = bucket is not None and bucket > self.short_context
        if large and (
            longest_context > self.short_context or bucket - tokens > bucket * LARGE_BUCKET_PADDING
        ):
            return None
        return bucket

    def graph_tokens(self, tokens: int, seqs: int, longest_context: int = 0) -> int:
        """How many of a prompt step's `tokens` to compute so that it replays from a graph: all of them where
        they fit a bucket, else the largest bucket below them; the scheduler leaves the rest of the prompt
        chunks to the next step (`Scheduler.step_tokens`). Why: an eager prompt step costs ~12 ms of host
        time whatever its size, and a server's arrivals, spread over a few milliseconds, made steps of
        2,200-5,800 tokens that fit no bucket within `LARGE_BUCKET_PADDING`: they took 18-35 ms where the
        device needs ~3.4 us a token (T17 of 2026-11-24, docs/llm-runs.md). Cut, the last request of such a
        wave had its first token 10-15 ms sooner in the engine, and the server's waves rose from 0.79-0.82 to
        0.89-0.91 of the engine loop (T18). Unchanged where cutting gains no graph: a chunk ending past
        `short_context` (long prompts run eagerly anyway) or more sequences than the graphs hold."""
        if self.bucket_for(tokens, seqs, longest_context) is not None:
            return tokens
        if seqs > self.max_seqs or longest_context > self.short_context:
            return tokens
        below = [b for b in self.buckets if b < tokens]
        return below[-1] if below else tokens

    @torch.inference_mode()
    def run(
        self,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence],
        positions: list[int],
        chunk_layout: np.ndarray,
        carry_rows: torch.Tensor | None,
        carry_ids: torch.Tensor | None,
    ) -> torch.Tensor | None:
        """Hidden states [tokens, hidden] of the step (decode rows first, then the chunks), or None when it
        fits no bucket. `positions`: each decode row's position; `chunk_layout`: [2, chunk tokens] positions
        and slots of the chunks' tokens."""
        tokens = len(decode) + chunk_layout.shape[1]
        longest = max((seq.num_computed + n for seq, n in chunks), default=0)
        bucket = self.bucket_for(tokens, len(decode) + len(chunks), longest)
        if bucket is None:
            return None
        self._fill(chunks, decode, positions, chunk_layout)
        if carry_ids is not None:
            ids = self._view(self._dev, "ids")
            if carry_rows is None:
                ids[: carry_ids.shape[0]].copy_(carry_ids)
            else:
                ids.index_copy_(0, carry_rows, carry_ids)
        if bucket in self.graphs:
            graph, out = self.graphs[bucket]
            graph.replay()
            return out[:tokens]
        return self._forward(bucket)[:tokens]

    def _fill(
        self,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence],
        positions: list[int],
        layout: np.ndarray,
    ) -> None:
        """The step into the next pinned buffer, then one copy to the device."""
        self._turn ^= 1
        host = self._hosts[self._turn]
        tokens = self._fill_tokens(host.numpy(), chunks, decode, positions, layout)
        self._fill_sequences(host.numpy(), chunks, decode, positions, tokens)
        end = self._at["bt"][0] + (len(decode) + len(chunks)) * self.max_blocks  # the table rows in use
        self._dev[:end].copy_(host[:end], non_blocking=True)

    def _fill_tokens(
        self,
        h: np.ndarray,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence],
        positions: list[int],
        layout: np.ndarray,
    ) -> int:
        """Ids, positions and cache slots: decode rows, then the chunks' tokens, then padding."""
        d = len(decode)
        tokens = d + layout.shape[1]
        ids, pos, slots = (h[a:b] for a, b in (self._at["ids"], self._at["pos"], self._at["slots"]))
        ids[:d] = [s.token_ids[-1] for s in decode]
        start = d
        for seq, n in chunks:  # chunk ids, back to back after the decode rows
            ids[start : start + n] = seq.token_ids[seq.num_computed : seq.num_computed + n]
            start += n
        pos[:d] = positions
        slots[:d] = [slot_of(s.blocks, p) for s, p in zip(decode, positions, strict=True)]
        pos[d:tokens], slots[d:tokens] = layout[0], layout[1]
        ids[tokens:], pos[tokens:], slots[tokens:] = 0, 0, 0  # padding: block 0, position 0
        return tokens

    def _fill_sequences(
        self,
        h: np.ndarray,
        chunks: list[tuple[Sequence, int]],
        decode: list[Sequence],
        positions: list[int],
        tokens: int,
    ) -> None:
        """Per sequence (decode rows are one-query chunks): query starts, context lengths, block tables; and
        the attention programs."""
        d = len(decode)
        q_lens = np.fromiter(
            [*(1 for _ in decode), *(n for _, n in chunks)], dtype=np.int64, count=d + len(chunks)
        )
        cu = h[slice(*self._at["cu_q"])]
        cu[0] = 0
        cu[1 : len(q_lens) + 1] = np.cumsum(q_lens)
        cu[len(q_lens) + 1 :] = tokens
        ctx = h[slice(*self._at["ctx"])]
        ctx[:d] = [p + 1 for p in positions]
        ctx[d : d + len(chunks)] = [seq.num_computed + n for seq, n in chunks]
        ctx[d + len(chunks) :] = 0
        bt = h[slice(*self._at["bt"])].reshape(self.max_seqs, self.max_blocks)
        rows = [*((s, p + 1) for s, p in zip(decode, positions, strict=True)),
                *((seq, seq.num_computed + n) for seq, n in chunks)]  # fmt: skip
        for i, (seq, n_ctx) in enumerate(rows):
            k = blocks_needed(n_ctx)
            bt[i, :k] = seq.blocks[:k]
        prog_seq, prog_q0 = varlen_programs(q_lens, self.bq, self.max_programs)
        h[slice(*self._at["prog_seq"])] = prog_seq
        h[slice(*self._at["prog_q0"])] = prog_q0
