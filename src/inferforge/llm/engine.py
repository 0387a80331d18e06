"""`LLMEngine`: the synchronous core. `step()` is schedule, execute, update; nothing here knows about HTTP.

Typical use (the async wrapper in `async_engine.py` does this on a background thread):

    engine = LLMEngine.from_pretrained("path/to/model", EngineConfig(device="cuda"))
    ids = tuple(engine.tokenizer.encode("Hello"))
    engine.add_request(EngineRequest("r1", ids, SamplingParams(max_tokens=20)))
    while engine.has_unfinished():
        for out in engine.step(): ...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from inferforge.errors import InferforgeError, NotApplicable
from inferforge.heap import refreeze
from inferforge.llm.detok import NO_TEXT, IncrementalDetokenizer, Tokenizer
from inferforge.llm.engine_config import EngineConfig
from inferforge.llm.kernels import choose_kernels
from inferforge.llm.kv_cache import (
    BLOCK_SIZE,
    BlockAllocator,
    attach_cache,
    blocks_needed,
    copy_blocks,
    plan_cache,
)
from inferforge.llm.model import DecoderLM
from inferforge.llm.prompt_logprobs import PromptLogprobs
from inferforge.llm.protocol import (
    EngineOutput,
    EngineRequest,
    EngineStats,
    RequestTiming,
    SamplingParams,
    TokenLogprob,
    merge_outputs,
)
from inferforge.llm.runner import ModelRunner
from inferforge.llm.sampler import PreparedBatch, SampleResult, SamplingBatch, prepare, sample, to_device
from inferforge.llm.scheduler import RequestState, Scheduler, SchedulerConfig, Sequence, StepPlan
from inferforge.llm.speculative import SpecConfig, TokenArrays, accepted, eligible, propose
from inferforge.llm.structured import GrammarCompiler, allowed, consume, resolve
from inferforge.llm.weights import load_model


@dataclass
class _InFlight:
    """A decode step launched on the device and not yet read back by the host."""

    rows: list[Sequence]
    row_of: dict[int, int]  # id(sequence) -> its row
    prep: PreparedBatch  # the rows' sampling parameters on the device (reused while the rows stay)
    result: SampleResult  # token_ids on the device: the next step's inputs
    host_ids: torch.Tensor  # their copy in pinned memory, valid once `done` has fired
    done: torch.cuda.Event | None = field(default=None)


def _useful_buckets(buckets: tuple[int, ...], max_step_tokens: int) -> tuple[int, ...]:
    """The buckets a step can use: up to the first one that holds the largest step."""
    out = []
    for b in sorted(buckets):
        out.append(b)
        if b >= max_step_tokens:
            break
    return tuple(out)


def _same(a: list[Sequence], b: list[Sequence]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


class LLMEngine:
    def __init__(self, folder: str | Path, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.folder = Path(folder)
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InferforgeError(
                "device cuda was asked for but no CUDA device is available; use --device cpu"
            )
        transform = None
        if config.quant is not None:
            from inferforge.llm.quant import IMPLEMENTED, OFFERED, quantize_model

            if config.quant not in (IMPLEMENTED if config.experimental_quant else OFFERED):
                raise NotApplicable(
                    f"quant {config.quant!r} is not offered: only formats measured faster than bf16 "
                    "end to end "
                    f"are ({', '.join(OFFERED)}); see docs/llm-engine.md"
                )
            if self.device.type != "cuda":
                raise NotApplicable(
                    f"quant {config.quant!r} needs a CUDA device (gemlite kernels); use --device cuda"
                )

            fmt: str = config.quant

            def transform(m: DecoderLM) -> None:
                from inferforge.llm.quant import load_tuned_configs

                load_tuned_configs(self.device)
                quantize_model(m, fmt, experimental=config.experimental_quant)

        self.model = load_model(
            self.folder,
            device=self.device,
            dtype=config.torch_dtype,
            max_model_len=config.max_model_len,
            transform=transform,
            default_cap=4096,
        )
        self.max_model_len = self.model.max_model_len
        choice = choose_kernels(self.model, config, self.device)
        decode_fn, self.decode_kernel, self.gemv_error = (
            choice.decode_fn,
            choice.decode_kernel,
            choice.gemv_error,
        )
        self.tokenizer = Tokenizer(self.folder)
        self._grammars: GrammarCompiler | None = None  # built at the first structured request
        spec = plan_cache(
            self.model,
            config.torch_dtype,
            tokens=config.kv_cache_tokens,
            memory_fraction=config.kv_cache_memory_fraction,
            device=self.device,
        )
        attach_cache(self.model, spec, self.device)
        self.allocator = BlockAllocator(spec.num_blocks)
        self.scheduler = Scheduler(
            SchedulerConfig(
                config.max_num_seqs,
                max(config.max_num_batched_tokens, config.max_num_seqs),
                config.max_waiting,
                self.max_model_len,
                config.admit_delay_steps,
                config.enable_prefix_caching,
                reserve_full_budget=config.reserve_full_budget,
            ),
            self.allocator,
        )
        self.runner = ModelRunner(
            self.model,
            self.device,
            max_num_seqs=config.max_num_seqs,
            max_model_len=self.max_model_len,
            cuda_graphs=config.cuda_graphs,
            decode_fn=decode_fn,
            buckets=config.decode_buckets,
            varlen_fn=choice.varlen_fn,
            prefill_buckets=_useful_buckets(config.prefill_graph_tokens, config.max_num_batched_tokens),
        )
        self.fit_prompt_steps_to_graphs()
        if config.speculative_tokens:  # verification steps: decode graphs of several rows a sequence
            self.runner.capture_verify(config.speculative_max_batch * (1 + config.speculative_tokens))
        if config.quant is not None:  # the decode graphs are captured: their shapes are tuned now
            from inferforge.llm.quant import save_tuned_configs

            save_tuned_configs(self.device)
        self.eos_ids = set(self.model.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        self.generated_total = 0
        self.device_wait_s = 0.0
        self._inflight: _InFlight | None = None
        pinned = self.device.type == "cuda"
        # Two pinned buffers in turn: step k+1's samples are copied out while step k's are still read.
        self._host_ids = [torch.zeros(config.max_num_seqs, dtype=torch.long, pin_memory=pinned) for _ in "ab"]
        self._turn = 0
        self._spec = (
            SpecConfig(config.speculative_tokens, max_batch=config.speculative_max_batch)
            if config.speculative_tokens
            else None
        )
        self._spec_arrays = TokenArrays()
        self.spec_draft_tokens = self.spec_accepted_tokens = 0
        if config.freeze_gc_heap:
            refreeze()

    @classmethod
    def from_pretrained(cls, folder: str | Path, config: EngineConfig | None = None) -> LLMEngine:
        return cls(folder, config)

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request: EngineRequest) -> None:
        """Queue a request; raises QueueFullError or RequestTooLargeError (both InferforgeError) at once."""
        max_tokens = self.scheduler.check(request)
        if any(not 0 <= t < self.model.cfg.vocab_size for t in request.prompt_ids):
            raise InferforgeError(
                f"request {request.request_id}: prompt holds token ids outside the vocabulary"
            )
        if any(t >= self.model.cfg.vocab_size for t, _ in request.params.logit_bias):
            raise InferforgeError(
                f"request {request.request_id}: logit_bias names token ids outside the vocabulary"
            )
        p = request.params
        matchers = self._matchers(p)
        state = RequestState(request, time.monotonic(), max_tokens=max_tokens)
        if p.prompt_logprobs is not None:
            state.prompt_lps = PromptLogprobs(p.prompt_logprobs, request.prompt_ids)
        for i in range(p.n):
            gen = None
            if p.seed is not None:
                gen = torch.Generator(device=self.device)
                gen.manual_seed(p.seed + i)
            detok = (
                IncrementalDetokenizer(self.tokenizer, p.stop, p.skip_special_tokens)
                if p.detokenize
                else NO_TEXT
            )
            seq = Sequence(state, i, list(request.prompt_ids), detok, gen)
            seq.matcher = matchers[i] if matchers else None
            state.seqs.append(seq)
        self.scheduler.add(state)

    def _matchers(self, params: SamplingParams) -> list | None:
        """One grammar matcher per sequence for a structured request (StructuredOutputError if the
        constraint does not compile), None for free text."""
        if params.structured is None:
            return None
        if self._grammars is None:
            self._grammars = GrammarCompiler(
                self.tokenizer.hf, self.model.cfg.vocab_size, self.eos_ids, pinned=self.device.type == "cuda"
            )
        return self._grammars.matchers(params.structured, params.n)

    def abort(self, request_id: str) -> list[EngineOutput]:
        """Drop a queued or running request and free its blocks; returns its final 'abort' outputs."""
        state = self.scheduler.abort(request_id)
        if state is None:
            return []
        state.finished_at = time.monotonic()
        outs = []
        for s in state.seqs:
            if not s.finished:
                s.finish_reason = "abort"
                outs.append(self._output(s))
        flight = self._inflight
        if flight is not None and all(s.finished for s in flight.rows):
            if flight.done is not None:
                flight.done.synchronize()  # its pinned buffer is reused by the next launch
            self._inflight = None
        return outs

    def stop_sequence(self, request_id: str, index: int) -> bool:
        """End one running sequence as a stop string would: a client that makes the text itself found one
        (`serve/openai/engine_link.py`). Its blocks go back with its request's; nothing more is emitted for
        it. False when it had already ended (or the request is unknown): nothing changed."""
        state = next((r for r in self.scheduler.running if r.request.request_id == request_id), None)
        if state is None or not 0 <= index < len(state.seqs) or state.seqs[index].finished:
            return False
        state.seqs[index].finish_reason = "stop"
        if state.finished:
            state.finished_at = time.monotonic()
        return True

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running or self._inflight)

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.allocator.num_blocks - 1,
            kv_blocks_used=self.allocator.num_used,
            generated_tokens_total=self.generated_total,
            device_wait_s_total=self.device_wait_s,
            prefix_cached_tokens_total=self.scheduler.cached_tokens_total,
            preemptions_total=self.scheduler.preemptions_total,
            recomputed_tokens_total=self.scheduler.recomputed_tokens_total,
            spec_draft_tokens_total=self.spec_draft_tokens,
            spec_accepted_tokens_total=self.spec_accepted_tokens,
        )

    def kernel_summary(self) -> str:
        """One line on which optional kernels this engine runs on its device and why one is off, for a
        server's startup log (each is switched on only after matching its reference on the device)."""
        graphs = self.runner.prefill_graphs
        if graphs is not None:
            prompts = f"CUDA graphs up to {graphs.buckets[-1]} tokens ({len(graphs.graphs)} buckets)"
        else:
            prompts = f"eager ({self.runner.prefill_graph_error or 'no graphs asked for or possible here'})"
        gemv = "on" if self.model.gemv_ops is not None else f"off ({self.gemv_error or 'not applicable'})"
        return (
            f"device {self.device}, decode attention {self.decode_kernel}, batch-1 GEMVs {gemv}, "
            f"decode steps {'CUDA graphs' if self.runner.graphs else 'eager'}, prompt steps {prompts}"
        )

    # ---- the loop --------------------------------------------------------------------------------
    def fit_prompt_steps_to_graphs(self) -> None:
        """With graphs of prompt steps (and `align_prompt_steps`), the scheduler cuts a step that fits no
        bucket to one that does (`PrefillGraphs.graph_tokens`); called again if the runner's graphs change."""
        graphs, cfg = self.runner.prefill_graphs, self.config
        aligned = cfg.align_prompt_steps and cfg.mixed_steps
        self.scheduler.step_tokens = graphs.graph_tokens if graphs is not None and aligned else None

    def step(self) -> list[EngineOutput]:
        """Schedule and launch one step, then read back the step before it.

        Decode rows whose last token is still on the device (sampled by the step in flight) take it from
        there, so the host's bookkeeping, detokenization and stop checks for step k run while the device
        computes step k+1, whatever joins or leaves in between. A sequence that stops on EOS or a stop string
        is computed one step too many, inside its own reserved blocks, and that row is dropped; one that
        reaches max_tokens is known in advance and not fed again. Requests that need the newest token on the
        host before sampling (repetition, presence or frequency penalty) or logprobs make their steps
        synchronous."""
        outputs: list[EngineOutput] = []
        flight = self._inflight
        overlap = self._may_overlap()  # one scan of the requests per step
        if flight is not None and not overlap:
            outputs, flight = self._read_back(flight), None
            self.scheduler.free_finished()
        plan = self.scheduler.schedule()
        if flight is not None:
            plan.decode = [
                s for s in plan.decode if id(s) not in flight.row_of or s.num_output + 1 < s.group.max_tokens
            ]
        if plan.empty:
            if flight is not None:
                outputs += self._read_back(flight)
                self.scheduler.free_finished()
            return outputs
        drafts = self._drafts(plan) if flight is None else None
        if drafts is not None:
            outputs += self._speculate(plan.decode, drafts)
            self.scheduler.free_finished()
            return outputs
        new, early = self._launch(plan, flight)
        if early is not None:
            outputs += early
        elif flight is not None:
            outputs += self._read_back(flight)
        if new is not None:
            if overlap:
                self._inflight = new
            else:
                outputs += self._read_back(new)
        self.scheduler.free_finished()
        return outputs

    def _launch(
        self, plan: StepPlan, flight: _InFlight | None
    ) -> tuple[_InFlight | None, list[EngineOutput] | None]:
        """Run the plan's forward passes and sampling on the device. Nothing here waits for the device,
        except where a row's grammar needs the step in flight: that step is read back (its outputs
        returned) once this step's forward pass is queued."""
        # Rows to sample are known before the forward pass: stage their parameters now, asynchronously.
        done = [seq for seq, n in plan.prefill if seq.num_computed + n >= len(seq.token_ids)]
        rows = [*plan.decode, *(s for seq in done for s in seq.group.seqs)]
        steady = flight is not None and _same(rows, flight.rows)
        prep: PreparedBatch | None
        if steady:  # the same rows as the step in flight: reuse its staged parameters and row map
            assert flight is not None
            prep, row_of = flight.prep, flight.row_of
        else:
            prep = (
                prepare(self._sampling_batch(rows), self.device, self.model.cfg.vocab_size) if rows else None
            )
            row_of = {id(s): i for i, s in enumerate(rows)}
        parts: list[torch.Tensor] = []
        carried = self._carried(plan.decode, flight) if plan.decode else (None, None, None)
        mixed = self.config.mixed_steps and bool(plan.prefill)
        if plan.decode and not mixed:
            parts.append(self.runner.decode(plan.decode, *carried))
        if plan.prefill:  # with mixed_steps, decode rows ride in the same pass (one read of the weights)
            riders = plan.decode if mixed else []
            logits, _, hidden = self.runner.prefill(
                plan.prefill, riders, *(carried if mixed else (None, None, None))
            )
            d = len(riders)
            if d:
                parts.append(logits[:d])
            self._prompt_logprobs(plan.prefill, hidden, d)
            for seq, n in plan.prefill:
                seq.num_computed += n
                self.scheduler.computed(seq, seq.num_computed - n)
            for seq in done:
                self._fork(seq)
            if done:
                index = [d + j for j, seq in enumerate(done) for _ in seq.group.seqs]
                parts.append(logits[to_device(index, self.device, torch.long)])
        for seq in plan.decode:
            seq.num_computed += 1
        if prep is None:
            return None, None
        early = None
        if any(s.matcher is not None for s in rows):
            # The grammars need the newest tokens: read the step in flight back now, while this step's
            # forward pass runs, then stage the masks (the sampling waits for them, the forward does not).
            if flight is not None:
                early = self._read_back(flight)
            prep = replace(prep, allowed=self._grammar_mask(rows))
        result = sample(torch.cat(parts) if len(parts) > 1 else parts[0], prep)
        self._turn ^= 1
        host = self._host_ids[self._turn][: len(rows)]
        host.copy_(result.token_ids, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        return _InFlight(rows, row_of, prep, result, host, event), early

    def _carried(
        self, rows: list[Sequence], flight: _InFlight | None
    ) -> tuple[list[bool] | None, torch.Tensor | None, torch.Tensor | None]:
        """(ahead, carry_rows, carry_ids) for decode rows: those whose newest token is in flight read it on
        the device (carry_rows None: all rows, in the flight's order)."""
        if flight is None:
            return None, None, None
        ids = flight.result.token_ids
        if _same(rows, flight.rows):  # steady decode: every row's token is in flight, in the same order
            return [True] * len(rows), None, ids
        ahead, src, dst = [], [], []
        for i, s in enumerate(rows):
            j = flight.row_of.get(id(s))
            ahead.append(j is not None)
            if j is not None:
                src.append(j)
                dst.append(i)
        if not src:
            return None, None, None
        idx = to_device(src + dst, self.device, torch.long)
        return ahead, idx[len(src) :], ids[idx[: len(src)]]

    def _read_back(self, flight: _InFlight) -> list[EngineOutput]:
        """Wait for a launched step's samples and apply them (the step's one device-to-host read)."""
        if self._inflight is flight:
            self._inflight = None
        if flight.done is not None:
            t0 = time.perf_counter()
            flight.done.synchronize()
            self.device_wait_s += time.perf_counter() - t0
        result = flight.result
        lps = result.logprobs.tolist() if result.logprobs is not None else None
        top = None
        if result.top_ids is not None and result.top_logprobs is not None:
            top = (result.top_ids.tolist(), result.top_logprobs.tolist())
        return self._update(flight.rows, flight.host_ids.tolist(), lps, top)

    def _may_overlap(self) -> bool:
        """Overlap unless a request that may be scheduled needs host state of its newest token, or its next
        step may be a speculative one (drafts are looked up in the tokens on the host)."""
        if not self.config.overlap_decode:
            return False
        states = [*self.scheduler.running, *self.scheduler.waiting]
        params = [r.request.params for r in states]
        if any(p.needs_history or p.logprobs is not None for p in params):
            return False
        spec = self._spec
        if (
            spec is None
            or len(states) > spec.max_batch
            or any(p.temperature or p.logit_bias or p.structured for p in params)
        ):
            return True
        # Synchronous steps cost the batch-1 engine ~25% (Q5: 752-779 against 957-996 tok/s): go synchronous
        # only while a lookup in the tokens already on the host finds something to draft.
        arrays = self._spec_arrays
        live = [s for r in self.scheduler.running if r.prefilled for s in r.seqs if not s.finished]
        arrays.keep({id(s) for s in live})  # no array outlives its sequence's decoding
        lo, hi = spec.ngram_min, spec.ngram_max
        return not any(propose(arrays.of(id(s), s.token_ids), 1, lo, hi) for s in live)

    def _drafts(self, plan: StepPlan) -> list[list[int]] | None:
        """Prompt-lookup drafts for each decode row, or None where this step decodes as usual: speculation
        off, prompt chunks to compute, too many rows, a row that is not greedy on raw logits, or no draft."""
        spec, rows = self._spec, plan.decode
        if spec is None or plan.prefill or not rows or len(rows) > spec.max_batch:
            return None
        if not all(eligible(s.group.request.params, s.num_output) for s in rows):
            return None
        # every row of the verification pass must fit the step's tokens and the largest decode bucket
        budget = min(self.config.max_num_batched_tokens, self.runner.buckets[-1]) - len(rows)
        arrays, out = self._spec_arrays, []
        arrays.keep({id(s) for s in rows})
        for s in rows:
            k = min(spec.num_tokens, s.group.max_tokens - s.num_output - 1, budget)
            d = propose(arrays.of(id(s), s.token_ids), k, spec.ngram_min, spec.ngram_max) if k > 0 else []
            d = d[: self._draft_room(s, len(d))]
            budget -= len(d)
            out.append(d)
        return out if any(out) else None

    def _draft_room(self, seq: Sequence, n: int) -> int:
        """How many of n drafts fit the sequence's blocks, taking free blocks for them if needed (never a
        preemption: drafts are a bet, not a need)."""
        allocator = self.allocator
        while n and len(seq.blocks) * BLOCK_SIZE <= seq.num_computed + n and allocator.num_free:
            seq.blocks.extend(allocator.allocate(1))
        return max(0, min(n, len(seq.blocks) * BLOCK_SIZE - seq.num_computed - 1))

    def _speculate(self, rows: list[Sequence], drafts: list[list[int]]) -> list[EngineOutput]:
        """One pass over each row's last token and its drafts (as decode rows at successive positions,
        `runner.verify`); keep the drafts the model's greedy choice agrees with, then its next token."""
        lines = [(s, t, s.num_computed + i) for s, d in zip(rows, drafts, strict=True)
                 for i, t in enumerate([s.token_ids[-1], *d])]  # fmt: skip
        choices = self.runner.verify(lines).argmax(-1).tolist()  # the step's one device-to-host read
        made, at = [], 0
        for s, d in zip(rows, drafts, strict=True):
            toks = accepted(d, choices[at : at + len(d) + 1])
            at += len(d) + 1
            s.num_computed += len(toks)  # the fed last token and the accepted drafts are in the cache
            self.spec_draft_tokens += len(d)
            self.spec_accepted_tokens += len(toks) - 1
            made.append(toks)
        merged: dict[tuple[str, int], EngineOutput] = {}  # one delta per sequence for the step
        for j in range(max(len(t) for t in made)):
            now = [(s, t[j]) for s, t in zip(rows, made, strict=True) if len(t) > j]
            for out in self._update([s for s, _ in now], [tok for _, tok in now], None, None):
                key = (out.request_id, out.index)
                merged[key] = merge_outputs(merged[key], out) if key in merged else out
        return list(merged.values())

    def _fork(self, parent: Sequence) -> None:
        """After the prompt of sequence 0 is cached, copy its blocks to the request's other sequences."""
        group = parent.group
        n_blocks = blocks_needed(group.prompt_len)
        for child in group.seqs[1:]:
            # blocks taken from the prefix cache are the same blocks in every sequence: nothing to copy
            pairs = [
                (s, d)
                for s, d in zip(parent.blocks[:n_blocks], child.blocks[:n_blocks], strict=True)
                if s != d
            ]
            if pairs:
                copy_blocks(self.model, [s for s, _ in pairs], [d for _, d in pairs])
            child.num_computed = parent.num_computed

    def _sampling_batch(self, rows: list[Sequence]) -> SamplingBatch:
        params = [s.group.request.params for s in rows]
        seen = [s.token_ids if p.repetition_penalty != 1.0 else [] for s, p in zip(rows, params, strict=True)]
        outputs = None
        if any(p.output_penalties for p in params):
            outputs = [
                s.token_ids[s.group.prompt_len :] if p.output_penalties else []
                for s, p in zip(rows, params, strict=True)
            ]
        banned = None
        if any(p.min_tokens for p in params):
            banned = [
                list(self.eos_ids | set(p.stop_token_ids)) if s.num_output < p.min_tokens else []
                for s, p in zip(rows, params, strict=True)
            ]
        return SamplingBatch(params, [s.generator for s in rows], seen, outputs, banned)

    def _prompt_logprobs(self, chunks: list[tuple[Sequence, int]], hidden: torch.Tensor, row: int) -> None:
        """Score the prompt tokens of the chunks whose requests asked for prompt logprobs, from the step's
        hidden states (`row`: the first chunk's first row); their target tokens go over in one copy."""
        work, targets = [], []
        for seq, n in chunks:
            lps = seq.group.prompt_lps
            span = lps.span(seq.num_computed, n) if lps is not None else None
            if span is not None:
                work.append((seq, row, n, len(targets), span[1] - span[0]))
                targets.extend(lps.prompt[span[0] + 1 : span[1] + 1])
            row += n
        if not work:
            return
        dev = to_device(targets, self.device, torch.long)
        for seq, at, n, t0, count in work:
            lps = seq.group.prompt_lps
            lps.add_chunk(self.model, hidden[at : at + n], seq.num_computed, dev[t0 : t0 + count])

    def _grammar_mask(self, rows: list[Sequence]) -> torch.Tensor:
        """[rows, vocab] bool on the device: what each row's grammar allows next (rows without a matcher,
        or already finished, allow everything)."""
        assert self._grammars is not None
        for s in rows:
            if s.matcher is not None and not s.finished:
                s.matcher = resolve(s.matcher)
        bits = self._grammars.bitmask([None if s.finished else s.matcher for s in rows])
        return allowed(bits.to(self.device, non_blocking=True), self.model.cfg.vocab_size)

    def _update(
        self,
        rows: list[Sequence],
        ids: list[int],
        lps: list[float] | None,
        top: tuple[list[list[int]], list[list[float]]] | None,
    ) -> list[EngineOutput]:
        """Append each row's new token; rows already finished (aborted, or stopped while their next step
        was in flight) are skipped."""
        top_ids, top_lp = top if top is not None else (None, None)
        now = time.monotonic()
        outputs = []
        eos, output = self.eos_ids, self._output  # per row per step: locals, not attribute lookups
        register = self.scheduler.register_generated
        for i, (seq, tok) in enumerate(zip(rows, ids, strict=True)):
            if seq.finish_reason is not None:
                continue
            group = seq.group
            params = group.request.params
            seq.token_ids.append(tok)
            seq.pending_ids.append(tok)
            if group.first_token is None:
                group.first_token = now
            if lps is not None and params.logprobs is not None:
                k = params.logprobs
                alts = tuple(zip(top_ids[i][:k], top_lp[i][:k], strict=True)) if top_ids and top_lp else ()
                seq.pending_logprobs.append(TokenLogprob(tok, lps[i], alts))
            armed = params.min_tokens == 0 or seq.num_output >= params.min_tokens
            hit_stop = seq.detok.add(tok, check_stop=armed)
            if armed and (hit_stop or tok in params.stop_token_ids or (tok in eos and not params.ignore_eos)):
                seq.finish_reason = "stop"
            elif seq.matcher is not None and consume(seq.matcher, tok):
                seq.finish_reason = "stop"  # the grammar is complete: nothing more may follow
            elif len(seq.token_ids) - group.prompt_len >= group.max_tokens:
                seq.finish_reason = "length"
            if group.block_keys is not None and len(seq.token_ids) % BLOCK_SIZE < 2:
                register(seq)  # a block may have filled (overlapped: at 0; synchronous: a step later, 1)
            if seq.finish_reason is not None and group.finished:
                group.finished_at = now
            outputs.append(output(seq))
        self.generated_total += len(outputs)
        return outputs

    def _output(self, seq: Sequence) -> EngineOutput:
        group, params = seq.group, seq.group.request.params
        out = EngineOutput(
            request_id=group.request.request_id,
            index=seq.index,
            new_token_ids=tuple(seq.pending_ids),
            new_text=seq.detok.pop(final=seq.finished),
            logprobs=tuple(seq.pending_logprobs) if params.logprobs is not None else None,
            finished=seq.finished,
            finish_reason=seq.finish_reason,
            prompt_tokens=group.prompt_len,
            completion_tokens=seq.num_output,
            timing=RequestTiming(group.arrival, group.scheduled, group.first_token, group.finished_at),
        )
        if group.prompt_lps is not None and not seq.sent_prompt_lps and group.prompt_lps.complete:
            out.prompt_logprobs = group.prompt_lps.result()
            seq.sent_prompt_lps = True
        seq.pending_ids, seq.pending_logprobs = [], []
        return out

    # ---- convenience -----------------------------------------------------------------------------
    def generate(self, requests: list[EngineRequest]) -> dict[str, list[list[EngineOutput]]]:
        """Run requests to completion; returns, per request id, the outputs of each of its sequences."""
        results: dict[str, list[list[EngineOutput]]] = {}
        for r in requests:
            self.add_request(r)
            results[r.request_id] = [[] for _ in range(r.params.n)]
        while self.has_unfinished():
            for out in self.step():
                results[out.request_id][out.index].append(out)
        return results
