"""Speculative decoding by prompt lookup (n-gram drafts, as vLLM's `ngram` method), verified by the model.

Why: at small batches a decode step reads every weight to make one token per sequence, and the step costs
about the same for a few more tokens. Text that repeats what came before (code being edited, a summary
quoting its source, a structured answer) lets the next tokens be guessed from the context itself: find the
most recent earlier occurrence of the sequence's last n tokens and propose the k tokens that followed it. One
forward pass over the last token and the k drafts gives the model's own choice after each of them; drafts
are kept while they equal it, and the model's choice at the first difference (or after the last draft) is
added. So every step still makes at least one token, and the tokens are exactly greedy decoding's: the
model decides each one from the same context as it would one step at a time (up to the rounding of a
multi-token pass, as in chunked prefill).

Only greedy requests without logit processors are verified this way (temperature 0; no penalties, logit
bias, pending min_tokens or logprobs); a step with any other decoding request runs as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from inferforge.llm.protocol import SamplingParams


@dataclass(frozen=True)
class SpecConfig:
    """`num_tokens` drafts at most per sequence and step; n-grams of `ngram_max` down to `ngram_min` tokens
    are looked up; only while at most `max_batch` sequences decode (above it the step is less bound by
    weights and extra tokens cost more)."""

    num_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    max_batch: int = 4

    def __post_init__(self) -> None:
        if self.num_tokens < 1 or not 1 <= self.ngram_min <= self.ngram_max or self.max_batch < 1:
            raise ValueError(
                "speculative decoding needs num_tokens >= 1, 1 <= ngram_min <= ngram_max and max_batch >= 1, "
                f"got {self.num_tokens}, {self.ngram_min}, {self.ngram_max}, {self.max_batch}"
            )


def eligible(params: SamplingParams, num_output: int) -> bool:
    """Whether a sequence's next tokens may be verified in one pass: greedy on the model's raw logits."""
    return (
        params.temperature == 0.0
        and params.logprobs is None
        and not params.logit_bias
        and not params.needs_history
        and params.structured is None
        and num_output >= params.min_tokens
    )


def propose(tokens: np.ndarray, k: int, ngram_min: int, ngram_max: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix n-gram
    (ngram_max down to ngram_min tokens); [] where none occurs."""
    length = len(tokens)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = tokens[length - n :]
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: length - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []


def accepted(drafts: list[int], choices: list[int]) -> list[int]:
    """The drafts the model agrees with, then its own next token: `choices[i]` is the model's greedy token
    after the last token and drafts[:i] (len(drafts) + 1 of them)."""
    out = []
    for draft, choice in zip(drafts, choices, strict=False):
        if draft != choice:
            break
        out.append(draft)
    out.append(choices[len(out)])
    return out


@dataclass
class TokenArrays:
    """Each sequence's tokens as a growing numpy array, so a lookup does not convert the whole list every
    step (4,096 Python ints: ~0.1 ms)."""

    arrays: dict[int, tuple[np.ndarray, int]] = field(default_factory=dict)

    def of(self, key: int, tokens: list[int]) -> np.ndarray:
        buf, n = self.arrays.get(key, (np.empty(0, dtype=np.int64), 0))
        if len(tokens) < n:  # a different sequence under a reused id: start again
            n = 0
        if len(tokens) > len(buf):
            grown = np.empty(max(2 * len(buf), len(tokens) + 256), dtype=np.int64)
            grown[:n] = buf[:n]
            buf = grown
        buf[n : len(tokens)] = tokens[n:]
        self.arrays[key] = (buf, len(tokens))
        return buf[: len(tokens)]

    def keep(self, keys: set[int]) -> None:
        """Drop the arrays of sequences no longer decoding."""
        for key in [k for k in self.arrays if k not in keys]:
            del self.arrays[key]
