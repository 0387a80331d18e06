"""Batched sampling on the device: repetition penalty, greedy, temperature, top-k, top-p, per-request seeds.

Everything stays on the device as one batch; the engine reads the chosen ids (and logprobs) once per step. Seeded
rows draw their noise from their own `torch.Generator`, so a request's samples do not depend on its neighbours.
Sampling is the exponential race (argmax of p / q, q ~ Exp(1)), which equals drawing from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferforge.llm.protocol import SamplingParams


@dataclass
class SamplingBatch:
    """Per-row parameters for one step, built on the host and moved to the device in a few small copies."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    seen: list[list[int]]  # prompt + output ids per row, for the repetition penalty

    def __post_init__(self) -> None:
        if not len(self.params) == len(self.generators) == len(self.seen):
            raise ValueError("params, generators and seen must have one entry per row")

    @property
    def num_logprobs(self) -> int:
        return max((p.logprobs for p in self.params if p.logprobs is not None), default=-1)


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] chosen token's logprob
    top_ids: torch.Tensor | None  # [B, k]
    top_logprobs: torch.Tensor | None  # [B, k]


def _apply_repetition_penalty(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """As transformers does: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    rows = [i for i, p in enumerate(batch.params) if p.repetition_penalty != 1.0]
    if not rows:
        return logits
    width = max(len(batch.seen[i]) for i in rows)
    seen = torch.tensor([batch.seen[i] + batch.seen[i][:1] * (width - len(batch.seen[i])) for i in rows])
    seen = seen.to(logits.device, non_blocking=True)
    penalty = torch.tensor([batch.params[i].repetition_penalty for i in rows], device=logits.device)[:, None]
    idx = torch.tensor(rows, device=logits.device)
    sub = logits[idx]
    picked = sub.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    logits = logits.clone()
    logits[idx] = sub.scatter(1, seen, picked)
    return logits


def _noise(batch: SamplingBatch, shape: tuple[int, int], device: torch.device) -> torch.Tensor:
    q = torch.empty(shape, device=device).exponential_()
    for i, g in enumerate(batch.generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q


def _random_choice(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    device = logits.device
    temps = torch.tensor([p.temperature or 1.0 for p in batch.params], device=device)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in batch.params]
    top_p = [p.top_p for p in batch.params]
    if any(top_k) or any(p < 1.0 for p in top_p):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[1], device=device)[None, :]
        k = torch.tensor([k or logits.shape[1] for k in top_k], device=device)[:, None]
        sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
        p_lim = torch.tensor(top_p, device=device)[:, None]
        probs = probs.masked_fill((before > p_lim) & (ranks > 0), 0.0)
        choice = (probs / _noise(batch, tuple(probs.shape), device)).argmax(dim=-1)
        return order.gather(1, choice[:, None]).squeeze(1)
    probs = logits.softmax(dim=-1)
    return (probs / _noise(batch, tuple(probs.shape), device)).argmax(dim=-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
    """logits: [B, V] fp32 rows in the batch's order. Logprobs are of the model's own distribution."""
    raw = logits
    logits = _apply_repetition_penalty(logits, batch)
    greedy = [p.temperature == 0.0 for p in batch.params]
    ids = logits.argmax(dim=-1)
    if not all(greedy):
        drawn = _random_choice(logits, batch)
        mask = torch.tensor(greedy, device=logits.device)
        ids = torch.where(mask, ids, drawn)
    k = batch.num_logprobs
    if k < 0:
        return SampleResult(ids, None, None, None)
    lp = raw.log_softmax(dim=-1)
    chosen = lp.gather(1, ids[:, None]).squeeze(1)
    top_lp, top_ids = lp.topk(max(k, 1), dim=-1) if k > 0 else (None, None)
    return SampleResult(ids, chosen, top_ids, top_lp)
