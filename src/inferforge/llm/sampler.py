"""Batched sampling on the device: logit bias, repetition, presence and frequency penalties, grammar masks
(structured outputs), greedy, temperature, min-p, top-k, top-p, per-request seeds.

`prepare()` turns the step's per-row parameters into device tensors through pinned memory and asynchronous
copies, before the forward pass is launched, so sampling itself never waits on the host; the engine reads the
chosen ids (and logprobs) once per step. Seeded rows draw their noise from their own `torch.Generator`, so a
request's samples do not depend on its neighbours. Sampling is the exponential race (argmax of p / q with
q ~ Exp(1)), which draws from p.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferforge.llm.protocol import SamplingParams

_NUMPY = {torch.long: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def to_device(data: list | np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A host list on the device without a synchronising copy (pinned staging on CUDA). Through numpy: a
    prefill step's 3 x 8,192 ids, positions and slots took 1.7 ms in `torch.tensor`, 0.5 through numpy
    (this project's CPU box)."""
    t = (
        torch.from_numpy(np.asarray(data, dtype=_NUMPY[dtype]))
        if dtype in _NUMPY
        else torch.tensor(data, dtype=dtype)
    )
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@dataclass
class SamplingBatch:
    """Per-row parameters for one step, in the order of the logits rows."""

    params: list[SamplingParams]
    generators: list[torch.Generator | None]
    seen: list[list[int]]  # prompt + output ids per row, for the repetition penalty (empty when unused)
    # output ids per row, for the presence and frequency penalties (empty when unused; None: no row uses them)
    outputs: list[list[int]] | None = None
    # token ids each row may not sample this step (end-of-sequence and stop tokens before min_tokens)
    banned: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not len(self.params) == len(self.generators) == len(self.seen):
            raise ValueError("params, generators and seen must have one entry per row")
        if self.outputs is not None and len(self.outputs) != len(self.params):
            raise ValueError("outputs must have one entry per row")

    @property
    def num_logprobs(self) -> int:
        return max((p.logprobs for p in self.params if p.logprobs is not None), default=-1)


@dataclass
class PreparedBatch:
    """Device tensors for a SamplingBatch; None where no row needs the feature."""

    batch: SamplingBatch
    all_greedy: bool
    greedy: torch.Tensor | None = None  # [B] bool
    temperature: torch.Tensor | None = None  # [B, 1]
    top_k: torch.Tensor | None = None  # [B, 1], vocab size where off
    top_p: torch.Tensor | None = None  # [B, 1]
    min_p: torch.Tensor | None = None  # [B, 1], 0 where off
    penalty_rows: torch.Tensor | None = None  # [R] rows with a repetition penalty
    penalty: torch.Tensor | None = None  # [R, 1]
    seen: torch.Tensor | None = None  # [R, S] token ids (padded by repeating the first)
    counted_rows: torch.Tensor | None = None  # [C] rows with a presence or frequency penalty
    counted: torch.Tensor | None = None  # [C, T] their output ids (padded with 0, weight 0)
    counted_weight: torch.Tensor | None = None  # [C, T] 1 for a real id, 0 for padding
    presence: torch.Tensor | None = None  # [C, 1]
    frequency: torch.Tensor | None = None  # [C, 1]
    bias_at: tuple[torch.Tensor, torch.Tensor] | None = None  # [E] rows, [E] token ids of logit_bias entries
    bias: torch.Tensor | None = None  # [E] the values added there
    banned_at: tuple[torch.Tensor, torch.Tensor] | None = None  # [F] rows, [F] token ids set to -inf
    # [B, V] bool: what each row's grammar allows (structured outputs), set by the engine just before
    # sampling (`structured.allowed`), after the newest tokens reached the grammars
    allowed: torch.Tensor | None = None


def prepare(batch: SamplingBatch, device: torch.device, vocab_size: int) -> PreparedBatch:
    params = batch.params
    greedy = [p.temperature == 0.0 for p in params]
    out = PreparedBatch(batch, all(greedy))
    rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rows:
        width = max(len(batch.seen[i]) for i in rows)
        padded = [batch.seen[i] + batch.seen[i][:1] * (width - len(batch.seen[i])) for i in rows]
        out.seen = to_device(padded, device, torch.long)
        out.penalty = to_device([[params[i].repetition_penalty] for i in rows], device, torch.float32)
        out.penalty_rows = to_device(rows, device, torch.long)
    _prepare_output_penalties(batch, device, out)
    entries = [(i, t, b) for i, p in enumerate(params) for t, b in p.logit_bias]
    if entries:
        rows_e, ids_e, vals_e = zip(*entries, strict=True)
        at = to_device([list(rows_e), list(ids_e)], device, torch.long)
        out.bias_at = (at[0], at[1])
        out.bias = to_device(list(vals_e), device, torch.float32)
    banned = [(i, t) for i, ids in enumerate(batch.banned or ()) for t in ids]
    if banned:
        at = to_device([[i for i, _ in banned], [t for _, t in banned]], device, torch.long)
        out.banned_at = (at[0], at[1])
    if not out.all_greedy:
        out.greedy = to_device(greedy, device, torch.bool)
        out.temperature = to_device([[p.temperature or 1.0] for p in params], device, torch.float32)
        if any(p.min_p > 0.0 for p in params):
            out.min_p = to_device([[p.min_p] for p in params], device, torch.float32)
        if any(p.top_k for p in params) or any(p.top_p < 1.0 for p in params):
            out.top_k = to_device([[p.top_k or vocab_size] for p in params], device, torch.long)
            out.top_p = to_device([[p.top_p] for p in params], device, torch.float32)
    return out


def _prepare_output_penalties(batch: SamplingBatch, device: torch.device, out: PreparedBatch) -> None:
    params, outputs = batch.params, batch.outputs
    rows = [i for i, p in enumerate(params) if p.output_penalties and outputs and outputs[i]]
    if not rows:
        return
    assert outputs is not None
    width = max(len(outputs[i]) for i in rows)
    out.counted = to_device([outputs[i] + [0] * (width - len(outputs[i])) for i in rows], device, torch.long)
    weight = [[1.0] * len(outputs[i]) + [0.0] * (width - len(outputs[i])) for i in rows]
    out.counted_weight = to_device(weight, device, torch.float32)
    out.presence = to_device([[params[i].presence_penalty] for i in rows], device, torch.float32)
    out.frequency = to_device([[params[i].frequency_penalty] for i in rows], device, torch.float32)
    out.counted_rows = to_device(rows, device, torch.long)


@dataclass
class SampleResult:
    token_ids: torch.Tensor  # [B] long
    logprobs: torch.Tensor | None  # [B] chosen token's logprob
    top_ids: torch.Tensor | None  # [B, k]
    top_logprobs: torch.Tensor | None  # [B, k]


def _apply_repetition_penalty(logits: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
    """As transformers does: divide positive logits of seen tokens by the penalty, multiply negative ones."""
    if prep.seen is None:
        return logits
    assert prep.penalty_rows is not None and prep.penalty is not None
    sub = logits[prep.penalty_rows]
    picked = sub.gather(1, prep.seen)
    picked = torch.where(picked > 0, picked / prep.penalty, picked * prep.penalty)
    logits = logits.clone()
    logits[prep.penalty_rows] = sub.scatter(1, prep.seen, picked)
    return logits


def _apply_output_penalties(logits: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
    """As OpenAI defines them: logit - frequency * count - presence * (count > 0), count over the output."""
    if prep.counted is None:
        return logits
    assert prep.counted_rows is not None and prep.counted_weight is not None
    assert prep.presence is not None and prep.frequency is not None
    counts = torch.zeros(len(prep.counted), logits.shape[1], device=logits.device, dtype=logits.dtype)
    counts.scatter_add_(1, prep.counted, prep.counted_weight.to(logits.dtype))
    logits = logits.clone()
    logits[prep.counted_rows] -= prep.frequency * counts + prep.presence * (counts > 0).to(logits.dtype)
    return logits


def _noise(prep: PreparedBatch, like: torch.Tensor) -> torch.Tensor:
    q = torch.empty_like(like).exponential_()
    for i, g in enumerate(prep.batch.generators):
        if g is not None:
            q[i].exponential_(generator=g)
    return q


def _random_choice(logits: torch.Tensor, prep: PreparedBatch) -> torch.Tensor:
    assert prep.temperature is not None
    logits = logits / prep.temperature
    if prep.min_p is not None:  # after temperature, before top-k / top-p (as vLLM)
        probs = logits.softmax(dim=-1)
        floor = prep.min_p * probs.amax(dim=-1, keepdim=True)
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if prep.top_k is None:
        probs = logits.softmax(dim=-1)
        return (probs / _noise(prep, probs)).argmax(dim=-1)
    assert prep.top_p is not None
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= prep.top_k, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    probs = probs.masked_fill((before > prep.top_p) & (ranks > 0), 0.0)
    choice = (probs / _noise(prep, probs)).argmax(dim=-1)
    return order.gather(1, choice[:, None]).squeeze(1)


# Greedy's argmax in one Triton launch on CUDA (`argmax.py`); off: the five torch launches below.
ONE_LAUNCH_ARGMAX = {"on": True}


def argmax_rows(x: torch.Tensor, chunks: int = 64) -> torch.Tensor:
    """argmax over the last dim, ties to the first index like `torch.argmax`, in two passes when there are
    few rows: one row of a 128k vocabulary is a single-block reduction on the GPU (27 us on the H100 at
    batch 1, profiled), while 64 chunks reduce in parallel and a second pass picks the first chunk holding the
    maximum. On CUDA both passes are one launch (`argmax.argmax_last`; five here)."""
    rows, width = x.shape
    if x.is_cuda and ONE_LAUNCH_ARGMAX["on"] and x.stride(-1) == 1:
        from inferforge.llm.argmax import argmax_last

        return argmax_last(x)
    if rows * chunks > 4096 or width < 16 * chunks:
        return x.argmax(dim=-1)
    size = -(-width // chunks)
    if size * chunks != width:
        x = torch.nn.functional.pad(x, (0, size * chunks - width), value=float("-inf"))
    vals, idx = x.view(rows, chunks, size).max(dim=-1)
    first = vals.argmax(dim=-1, keepdim=True)
    return idx.gather(1, first).squeeze(1) + first.squeeze(1) * size


def sample(logits: torch.Tensor, prep: PreparedBatch) -> SampleResult:
    """logits: [B, V] fp32 rows in the batch's order. Logprobs are of the model's own distribution."""
    raw = logits
    if prep.bias_at is not None:  # OpenAI's logit_bias, before the penalties (as vLLM)
        assert prep.bias is not None
        logits = logits.index_put(prep.bias_at, prep.bias.to(logits.dtype), accumulate=True)
    logits = _apply_output_penalties(_apply_repetition_penalty(logits, prep), prep)
    if prep.banned_at is not None:  # min_tokens: no way to stop yet
        logits = logits.index_put(prep.banned_at, logits.new_tensor(float("-inf")))
    if prep.allowed is not None:  # structured outputs: last, so no bias or penalty can bring a token back
        logits = logits.masked_fill(~prep.allowed, float("-inf"))
    ids = argmax_rows(logits) if logits.is_cuda else logits.argmax(dim=-1)
    if not prep.all_greedy:
        assert prep.greedy is not None
        ids = torch.where(prep.greedy, ids, _random_choice(logits, prep))
    k = prep.batch.num_logprobs
    if k < 0:
        return SampleResult(ids, None, None, None)
    lp = raw.log_softmax(dim=-1)
    chosen = lp.gather(1, ids[:, None]).squeeze(1)
    top_lp, top_ids = lp.topk(k, dim=-1) if k > 0 else (None, None)
    return SampleResult(ids, chosen, top_ids, top_lp)
