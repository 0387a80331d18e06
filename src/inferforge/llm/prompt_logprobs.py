"""Prompt logprobs: the log-probability of every prompt token given the tokens before it, with its most
likely alternatives (vLLM's `prompt_logprobs`; OpenAI completions' `echo` with `logprobs`). It is how
evaluation harnesses score a model through a server (lm-evaluation-harness sends `echo: true, logprobs: 1,
max_tokens: 1` and reads the prompt's logprobs).

The prompt's hidden states already exist after its prefill; this applies the LM head to them, in slices of
`ROWS_PER_SLICE` rows (a 2,048-token chunk's fp32 logits over 128k tokens would be 1 GB at once), and keeps
each slice's result on the device until the request's first output, after which the engine has waited for
the step anyway. A request that asks for them computes its whole prompt: the prefix cache is not read for it
(`Scheduler._cached_prefix`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from inferforge.llm.protocol import TokenLogprob
from inferforge.llm.sampler import to_device

ROWS_PER_SLICE = 512


@dataclass
class PromptLogprobs:
    """One request's prompt logprobs as its chunks are computed."""

    k: int  # alternatives a position
    prompt: tuple[int, ...]
    done: int = 1  # prompt tokens covered (the first has no logprob: nothing comes before it)
    parts: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    _result: tuple[TokenLogprob, ...] | None = None

    @property
    def complete(self) -> bool:
        return self.done >= len(self.prompt)

    def add_chunk(self, model: torch.nn.Module, hidden: torch.Tensor, start: int) -> None:
        """`hidden`: the chunk's rows, positions start, start + 1, ...; position p scores prompt token p + 1.
        Positions already scored (a chunk computed again after a preemption) are skipped."""
        lo = max(start, self.done - 1)
        hi = min(start + hidden.shape[0], len(self.prompt) - 1)
        if hi <= lo:
            return
        targets = to_device(self.prompt[lo + 1 : hi + 1], hidden.device, torch.long)
        rows = hidden[lo - start : hi - start]
        for a in range(0, rows.shape[0], ROWS_PER_SLICE):
            # log p = logit - logsumexp: one reduction a row instead of a whole log_softmax written out
            logits = model.logits(rows[a : a + ROWS_PER_SLICE])  # type: ignore[operator]
            lse = logits.logsumexp(dim=-1, keepdim=True)
            t = targets[a : a + ROWS_PER_SLICE]
            chosen = (logits.gather(1, t[:, None]) - lse).squeeze(1)
            if self.k == 1:
                top, ids = logits.max(dim=-1, keepdim=True)
                self.parts.append((t, chosen, ids, top - lse))
            elif self.k:
                top, ids = logits.topk(self.k, dim=-1)
                self.parts.append((t, chosen, ids, top - lse))
            else:
                self.parts.append((t, chosen))
        self.done = hi + 1

    def result(self) -> tuple[TokenLogprob, ...]:
        """Prompt tokens 1.. with their logprobs (host values; converted once, shared by the n sequences)."""
        if self._result is None:
            if not self.parts:
                self._result = ()
                return self._result
            cols = [torch.cat(c) for c in zip(*self.parts, strict=True)]  # one copy to the host a column
            ids, chosen = cols[0].tolist(), cols[1].tolist()
            if len(cols) == 4:
                tops = zip(cols[2].tolist(), cols[3].tolist(), strict=True)
                alts = [tuple(zip(i, v, strict=True)) for i, v in tops]
            else:
                alts = [()] * len(ids)
            self._result = tuple(TokenLogprob(t, c, a) for t, c, a in zip(ids, chosen, alts, strict=True))
            self.parts = []
        return self._result
