"""Prompt logprobs: the log-probability of every prompt token given the tokens before it, with its most
likely alternatives (vLLM's `prompt_logprobs`; OpenAI completions' `echo` with `logprobs`). It is how
evaluation harnesses score a model through a server (lm-evaluation-harness sends `echo: true, logprobs: 1,
max_tokens: 1` and reads the prompt's logprobs).

The prompt's hidden states already exist after its prefill; this applies the LM head to them, in slices of
`ROWS_PER_SLICE` rows (a 2,048-token chunk's fp32 logits over 128k tokens would be 1 GB at once, 256 rows
are 131 MB), and copies each slice's logprobs to pinned host memory as they are computed, for the request's
first output. A request that asks for them computes its whole prompt: the prefix cache is not read for it
(`Scheduler._cached_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferforge.llm.protocol import PromptScores

ROWS_PER_SLICE = 256


@dataclass
class PromptLogprobs:
    """One request's prompt logprobs as its chunks are computed."""

    k: int  # alternatives a position
    prompt: tuple[int, ...]
    done: int = 1  # prompt tokens covered (the first has no logprob: nothing comes before it)
    # per slice, on the host: [rows, 1 + k] ids (the scored token, then the alternatives) and their logprobs
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    _ready: torch.cuda.Event | None = None
    _result: PromptScores | None = None

    @property
    def complete(self) -> bool:
        return self.done >= len(self.prompt)

    def span(self, start: int, n: int) -> tuple[int, int] | None:
        """The positions [lo, hi) of a chunk of n tokens from `start` still to score (position p scores
        prompt token p + 1; positions already scored, as when a preempted request computes its prompt
        again, are skipped); None if there are none."""
        lo, hi = max(start, self.done - 1), min(start + n, len(self.prompt) - 1)
        return (lo, hi) if hi > lo else None

    def add_chunk(
        self, model: torch.nn.Module, hidden: torch.Tensor, start: int, targets: torch.Tensor
    ) -> None:
        """`hidden`: the chunk's rows, positions start, start + 1, ...; `targets`: the prompt tokens its
        `span` scores, already on the device (the engine sends a step's in one copy)."""
        span = self.span(start, hidden.shape[0])
        if span is None:
            return
        lo, hi = span
        rows = hidden[lo - start : hi - start]
        for a in range(0, rows.shape[0], ROWS_PER_SLICE):
            # log_softmax is one fused kernel (a read and a write); logsumexp was five passes, 0.31 ms a
            # 256-row slice against ~0.1 (S-run profile, prompt_logprobs_probe.py)
            lp = model.logits(rows[a : a + ROWS_PER_SLICE]).log_softmax(dim=-1)  # type: ignore[operator]
            t = targets[a : a + ROWS_PER_SLICE, None]
            ids, vals = t, lp.gather(1, t)
            if self.k:
                top, top_ids = lp.max(dim=-1, keepdim=True) if self.k == 1 else lp.topk(self.k, dim=-1)
                ids, vals = torch.cat([t, top_ids], 1), torch.cat([vals, top], 1)
            self.parts.append((_to_host(ids), _to_host(vals)))
        if hidden.is_cuda:  # `result` waits for this, not for whatever the stream runs after it
            self._ready = torch.cuda.Event()
            self._ready.record()
        self.done = hi + 1

    def result(self) -> PromptScores:
        """Prompt tokens 1.. with their logprobs (host values; made once, shared by the n sequences).
        The values were copied out as they were computed: waiting for those copies, not for the device's
        stream, keeps an overlapped engine's next step running."""
        if self._result is None:
            if self._ready is not None:
                self._ready.synchronize()
            if self.parts:
                ids = torch.cat([i for i, _ in self.parts])
                vals = torch.cat([v for _, v in self.parts])
            else:
                ids, vals = torch.zeros(0, 1 + self.k, dtype=torch.long), torch.zeros(0, 1 + self.k)
            top_ids, top_lps = ids[:, 1:].reshape(-1).tolist(), vals[:, 1:].reshape(-1).tolist()
            self._result = PromptScores(ids[:, 0].tolist(), vals[:, 0].tolist(), self.k, top_ids, top_lps)
            self.parts = []
        return self._result


def _to_host(x: torch.Tensor) -> torch.Tensor:
    """A copy on the host, queued (pinned memory) when `x` is on a CUDA device."""
    host = torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda)
    host.copy_(x, non_blocking=x.is_cuda)
    return host
