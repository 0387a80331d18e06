"""Which sequences run in the next step: continuous batching with chunked prefill and a bounded waiting queue.

Each step every decoding sequence gets one token, then prompts fill the remaining token budget in arrival
order, a long prompt split into chunks across steps so it never stalls the decoders for long. Finished and
aborted requests return their blocks at once.

KV blocks, as vLLM hands them out: a request (n = 1) is admitted with blocks for its prompt and first token
only, while a small reserve stays free, and its sequence takes one more block each time it crosses a block
boundary. When none is free, the newest running request is preempted: its blocks go back, it returns to the
front of the waiting queue, and once readmitted its prompt and the tokens it had generated are computed again
as one prompt (recompute), after which it goes on where it stopped. So the cache holds the tokens sequences
actually have, not the max_tokens they might reach: a client that leaves max_tokens at the cap no longer
takes a cap's worth of blocks. Requests with n > 1 (sequences forked from one prompt) and every request under
`reserve_full_budget` still reserve prompt + max_tokens for each sequence at admission and are never
preempted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from inferforge.errors import InferforgeError
from inferforge.llm.detok import IncrementalDetokenizer, NoText
from inferforge.llm.kv_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    blocks_needed,
    chain_seed,
    next_block_key,
    prompt_block_keys,
)
from inferforge.llm.protocol import EngineRequest, FinishReason, TokenLogprob

# Register blocks of generated tokens in the prefix cache as they fill (`Scheduler.register_generated`); off,
# only prompt blocks are (the behaviour before 2026-11-24), kept switchable for side-by-side measurements
# (benchmarks/llm/bench_chat_turns.py).
CACHE_GENERATED = {"on": True}


class QueueFullError(InferforgeError):
    """The waiting queue is at `max_waiting`; retry later (HTTP servers answer 429/503)."""


class RequestTooLargeError(InferforgeError):
    """A prompt plus its max_tokens cannot fit the model length or the KV cache."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Limits of one engine; validated here so a bad flag fails at start, not mid-run."""

    max_num_seqs: int = 64  # sequences decoding together (the largest decode batch)
    max_num_batched_tokens: int = 512  # tokens per step: decodes plus prefill chunks
    max_waiting: int = 256  # queued requests before add_request refuses
    max_model_len: int = 2048  # prompt + generated tokens of one sequence
    # While sequences decode, hold arriving prompts for up to this many steps unless they can fill every
    # free slot now, so that arrivals spread over a few milliseconds share one prompt step (each costs a
    # full read of the weights outside the decode graphs) instead of one each; an idle engine admits at
    # once. TGI's router waits the same way (max_waiting_tokens). 0: admit at once. No gain measured on the
    # H100 in interleaved runs, and a TTFT cost under light load (docs/llm-runs.md, H12 / H13): off.
    admit_delay_steps: int = 0
    # Reuse the KV blocks of earlier prompts that start with the same tokens (whole 16-token blocks): a shared
    # system prompt is computed once, not per request.
    prefix_caching: bool = False
    # Admit every request with blocks for its whole budget (prompt + max_tokens per sequence), so nothing is
    # ever preempted: the policy before preemption existed. Off: blocks as sequences grow (module docstring).
    reserve_full_budget: bool = False
    # Share of the cache's blocks that admission leaves free while others run, so that running sequences
    # can grow for a while before a preemption (vLLM's watermark, 1%); at least one block.
    kv_watermark: float = 0.01

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_waiting", "max_model_len"):
            if getattr(self, name) < 1:
                raise InferforgeError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise InferforgeError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.admit_delay_steps < 0:
            raise InferforgeError(f"admit_delay_steps must be >= 0, got {self.admit_delay_steps}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InferforgeError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                f"({self.max_num_seqs}) so every running sequence can decode each step"
            )


@dataclass
class Sequence:
    """One of a request's `n` outputs: its tokens, blocks, sampling state and text."""

    group: RequestState
    index: int
    token_ids: list[int]
    detok: IncrementalDetokenizer | NoText
    generator: torch.Generator | None
    blocks: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    finish_reason: FinishReason | None = None
    pending_ids: list[int] = field(default_factory=list)  # produced since the last output
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    # n > 1 with prefix caching: this sequence's chain of block keys, the prompt's full blocks and then its
    # own generated ones (with n = 1 the request's `block_keys` is the one chain).
    block_keys: list[bytes] | None = None
    # structured outputs: this sequence's llguidance matcher (`structured.GrammarCompiler`); None: free text
    matcher: Any = None
    sent_prompt_lps: bool = False  # its first output carried the request's prompt logprobs

    @property
    def num_output(self) -> int:
        return len(self.token_ids) - self.group.prompt_len

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    request: EngineRequest
    arrival: float
    seqs: list[Sequence] = field(default_factory=list)
    scheduled: float | None = None
    first_token: float | None = None
    finished_at: float | None = None
    max_tokens: int = 0
    queued_step: int = 0  # the scheduler's step count when it joined the waiting queue
    # Prefix keys of the full blocks (prefix caching): the prompt's, then (n = 1) generated ones as they fill;
    # with n > 1 each sequence continues the prompt's keys in its own `Sequence.block_keys`.
    block_keys: list[bytes] | None = None
    reserved: bool = False  # holds blocks for its whole budget from admission on; never preempted
    preemptions: int = 0  # times it was preempted (and its tokens computed again)
    readmit_step: int = -1  # the scheduler step it was last preempted in: not readmitted within that step
    prompt_lps: Any = None  # `prompt_logprobs.PromptLogprobs` when the request asked for them
    # The prompt is immutable: its length is read per row per step (a property cost ~3% of a decode step's
    # host work at 64 rows).
    prompt_len: int = field(init=False)
    # Tokens to compute before decoding: the prompt, or after a preemption the prompt and what was generated.
    prefill_len: int = field(init=False)

    def __post_init__(self) -> None:
        self.prompt_len = self.prefill_len = len(self.request.prompt_ids)

    @property
    def prefilled(self) -> bool:
        return self.seqs[0].num_computed >= self.prefill_len

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


@dataclass
class StepPlan:
    decode: list[Sequence]
    prefill: list[tuple[Sequence, int]]  # (sequence, tokens of its prompt to compute this step)

    @property
    def empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, allocator: BlockAllocator) -> None:
        self.config, self.allocator = config, allocator
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self.steps = 0  # schedule() calls so far: the clock of `admit_delay_steps`
        self.cached_tokens_total = 0  # prompt tokens taken from the prefix cache instead of computed
        self.preemptions_total = 0
        self.recomputed_tokens_total = 0  # tokens computed again after preemptions
        self.watermark = max(1, int(allocator.num_blocks * config.kv_watermark))
        # (step tokens, sequences, longest context) -> how many tokens to compute: the engine sets it to
        # its prompt-step graphs' `PrefillGraphs.graph_tokens` so a step fits a graph; None: every chunk fits
        self.step_tokens: Callable[[int, int, int], int] | None = None

    def check(self, request: EngineRequest) -> int:
        """Refuse what can never run; returns the effective max_tokens."""
        n_prompt, cfg = len(request.prompt_ids), self.config
        if n_prompt == 0:
            raise RequestTooLargeError(f"request {request.request_id}: the prompt is empty")
        if n_prompt >= cfg.max_model_len:
            raise RequestTooLargeError(
                f"request {request.request_id}: prompt of {n_prompt} tokens leaves no room to generate "
                "within "
                f"max_model_len={cfg.max_model_len}; shorten the prompt"
            )
        max_tokens = min(request.params.max_tokens, cfg.max_model_len - n_prompt)
        need = request.params.n * blocks_needed(n_prompt + max_tokens)
        if need > self.allocator.num_blocks - 1:
            raise RequestTooLargeError(
                f"request {request.request_id} needs {need} KV blocks but the cache has "
                f"{self.allocator.num_blocks - 1}; lower max_tokens or n, or give the cache more memory"
            )
        if request.params.n > cfg.max_num_seqs:
            raise RequestTooLargeError(f"n={request.params.n} exceeds max_num_seqs={cfg.max_num_seqs}")
        return max_tokens

    def add(self, state: RequestState) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(
                f"the waiting queue is full ({self.config.max_waiting} requests); "
                "retry later or raise max_waiting"
            )
        state.queued_step = self.steps
        state.reserved = self.config.reserve_full_budget or len(state.seqs) > 1
        self.waiting.append(state)

    def num_running_seqs(self) -> int:
        return sum(1 for r in self.running for s in r.seqs if s.finish_reason is None)

    def schedule(self) -> StepPlan:
        budget = self.config.max_num_batched_tokens
        self.steps += 1
        decode = self._decoding()
        # A sequence feeds position num_computed this step; past its last block it needs one more.
        short = [s for s in decode if len(s.blocks) * BLOCK_SIZE <= s.num_computed]
        if short and self._grow(short):
            decode = self._decoding()
        budget -= len(decode)
        prefill: list[tuple[Sequence, int]] = []
        for r in self.running:
            if not r.prefilled and budget > 0:
                seq = r.seqs[0]
                chunk = min(r.prefill_len - seq.num_computed, budget)
                prefill.append((seq, chunk))
                budget -= chunk
        running = self.num_running_seqs()  # once: per admission it made 64 admissions quadratic (~1 ms)
        hold = bool(decode) and self._hold(running)
        while self.waiting and budget > 0 and not hold:
            r = self.waiting[0]
            if r.finished:  # preempted, then ended by the token it had in flight
                self.waiting.popleft()
                continue
            if r.readmit_step == self.steps or running + len(r.seqs) > self.config.max_num_seqs:
                break
            if not self._admit(r):
                break
            self.waiting.popleft()
            self.running.append(r)
            running += len(r.seqs)
            seq = r.seqs[0]
            chunk = min(r.prefill_len - seq.num_computed, budget)
            prefill.append((seq, chunk))
            budget -= chunk
        if self.step_tokens is not None and prefill:
            _fit_step(self.step_tokens, len(decode), prefill)
        return StepPlan(decode, prefill)

    def _decoding(self) -> list[Sequence]:
        return [s for r in self.running if r.prefilled for s in r.seqs if s.finish_reason is None]

    def _admit(self, r: RequestState) -> bool:
        """Give `r` its blocks if they fit: the whole budget when reserved, else its tokens so far and the
        next one, with the watermark left free while others run."""
        seq = r.seqs[0]
        if r.reserved:
            need, spare = blocks_needed(r.prompt_len + r.max_tokens), 0
        else:
            need, spare = blocks_needed(len(seq.token_ids) + 1), self.watermark if self.running else 0
        reuse = self._cached_prefix(r)  # n > 1: every sequence shares them (full prompt blocks: read only)
        if not self.allocator.can_allocate((need - len(reuse)) * len(r.seqs) + spare, reuse):
            return False
        for s in r.seqs:
            self.allocator.acquire(reuse)
            s.blocks = reuse + self.allocator.allocate(need - len(reuse))
        r.prefill_len = len(seq.token_ids)
        seq.num_computed = len(reuse) * BLOCK_SIZE
        self.cached_tokens_total += seq.num_computed
        if r.preemptions:
            self.recomputed_tokens_total += r.prefill_len - seq.num_computed
        if r.scheduled is None:
            r.scheduled = time.monotonic()
        return True

    def _grow(self, short: list[Sequence]) -> bool:
        """One more block for each sequence in `short` (running order, oldest first); where none is free,
        preempt the newest running request that may be preempted, which may be the one asking. True if any
        request was preempted."""
        gone: set[int] = set()
        for s in short:
            if id(s.group) in gone:
                continue
            while len(s.blocks) * BLOCK_SIZE <= s.num_computed:
                if self.allocator.num_free:
                    s.blocks.extend(self.allocator.allocate(1))
                    continue
                victim = next(r for r in reversed(self.running) if not r.reserved and not r.finished)
                self._preempt(victim)
                gone.add(id(victim))
                if victim is s.group:
                    break
        return bool(gone)

    def _preempt(self, r: RequestState) -> None:
        """Back to the front of the waiting queue with no blocks; readmitted, it computes its prompt and its
        generated tokens again. A step still in flight may have written into its blocks or sampled its next
        token: the device runs steps in order, and that token is appended before it is readmitted (not in
        this step)."""
        self.running.remove(r)
        seq = r.seqs[0]
        self.allocator.free(seq.blocks)
        seq.num_computed = 0
        r.preemptions += 1
        r.readmit_step = self.steps
        r.queued_step = self.steps
        self.preemptions_total += 1
        self.waiting.appendleft(r)

    def _cached_prefix(self, r: RequestState) -> list[int]:
        """The cached blocks this request's prompt starts with (at least its last token is left to compute,
        for its logits)."""
        if not self.config.prefix_caching or r.prompt_lps is not None:  # prompt logprobs need every position
            return []
        if r.block_keys is None:
            r.block_keys = prompt_block_keys(r.request.prompt_ids, salt=r.request.cache_salt)
        return self.allocator.match(r.block_keys[: (len(r.seqs[0].token_ids) - 1) // BLOCK_SIZE])

    def computed(self, seq: Sequence, before: int) -> None:
        """`seq` computed its prompt from token `before` to `seq.num_computed`: register the full blocks
        that completed (the step that computes them is already queued on the device)."""
        keys = seq.group.block_keys
        if not keys or seq.index:
            return
        for i in range(before // BLOCK_SIZE, min(seq.num_computed // BLOCK_SIZE, len(keys))):
            self.allocator.register(seq.blocks[i], keys[i])

    def register_generated(self, seq: Sequence) -> None:
        """Key and register the blocks `seq` has filled past its prompt's (each once its every token is on
        the host and fed to a launched step), so that a later prompt repeating them, or `seq` readmitted
        after a preemption, reads them from the cache."""
        keys = self._chain(seq)
        if keys is None or not CACHE_GENERATED["on"]:
            return
        full = min(seq.num_computed, len(seq.token_ids)) // BLOCK_SIZE
        while len(keys) < full:
            j = len(keys)
            prev = keys[-1] if keys else chain_seed(seq.group.request.cache_salt)
            keys.append(next_block_key(prev, seq.token_ids[j * BLOCK_SIZE : (j + 1) * BLOCK_SIZE]))
            self.allocator.register(seq.blocks[j], keys[j])

    @staticmethod
    def _chain(seq: Sequence) -> list[bytes] | None:
        """The block keys `seq` extends: its request's with n = 1; with n > 1 its own, from the prompt's full
        blocks on (n answers, n chains), so a next turn that repeats any one of them reads its blocks."""
        group = seq.group
        if group.block_keys is None or len(group.seqs) == 1:
            return group.block_keys
        if seq.block_keys is None:
            seq.block_keys = group.block_keys[: group.prompt_len // BLOCK_SIZE]
        return seq.block_keys

    def _hold(self, running: int) -> bool:
        """`admit_delay_steps`: keep the waiting prompts out of this step (sequences are decoding)."""
        delay = self.config.admit_delay_steps
        if not delay or not self.waiting or self.steps - self.waiting[0].queued_step > delay:
            return False
        free, waiting = self.config.max_num_seqs - running, 0
        for r in self.waiting:
            waiting += len(r.seqs)
            if waiting >= free:
                return False
        return True

    def free_finished(self) -> list[RequestState]:
        done = [r for r in self.running if r.finished]
        for r in done:
            self.running.remove(r)
            for s in r.seqs:
                self.allocator.free(s.blocks)
        return done

    def abort(self, request_id: str) -> RequestState | None:
        for r in list(self.waiting):
            if r.request.request_id == request_id:
                self.waiting.remove(r)
                return r
        for r in self.running:
            if r.request.request_id == request_id:
                self.running.remove(r)
                for s in r.seqs:
                    self.allocator.free(s.blocks)
                return r
        return None


def _fit_step(
    step_tokens: Callable[[int, int, int], int], decode_rows: int, prefill: list[tuple[Sequence, int]]
) -> None:
    """Cut the step's last prompt chunks to the tokens `step_tokens` allows. A request whose chunk is cut to
    nothing stays admitted, with its blocks, and computes its prompt from the next step on, before any new
    admission, as a chunk that hit the token budget does."""
    total = decode_rows + sum(n for _, n in prefill)
    longest = max(seq.num_computed + n for seq, n in prefill)
    keep = step_tokens(total, decode_rows + len(prefill), longest)
    excess = total - keep
    if excess <= 0 or keep <= decode_rows:
        return
    while excess > 0:
        seq, n = prefill[-1]
        if n > excess:
            prefill[-1] = (seq, n - excess)
            return
        prefill.pop()
        excess -= n
