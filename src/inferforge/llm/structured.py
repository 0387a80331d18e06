"""Structured outputs: every sampled token keeps the output a possible sentence of a grammar.

A request's `SamplingParams.structured` (a JSON object, JSON under a schema, a regular expression, a choice of
strings, a Lark grammar) is compiled by llguidance, the Rust grammar engine vLLM and SGLang offer as a
backend, into one `LLMatcher` per sequence. Before each sampling the matcher writes the allowed next tokens
as a bitmask (32 tokens an int32) on the host; the sampler sets every other logit to -inf on the device;
after sampling the matcher consumes the token. A sequence ends with "stop" once its grammar can take nothing
more (a JSON object closed): no end-of-sequence token has to be sampled for it.

Why llguidance and not a mask of our own: its masks come from a lexer over the tokenizer's byte trie, tens of
microseconds a token for JSON schemas on 128k vocabularies, and it covers JSON Schema's keywords (bounds,
lengths, enums, patterns, `anyOf`, `$ref`) that a home-made automaton would not.

JSON is compact by default (`", "` and `": "` between items, no other whitespace): with free whitespace a
weak model can spend its whole budget on spaces inside an object. A schema may override that through
llguidance's `x-guidance` key (`{"x-guidance": {"whitespace_flexible": true}}`).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from inferforge.errors import InferforgeError
from inferforge.llm.protocol import StructuredOutput

log = logging.getLogger(__name__)

JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Grammar texts remembered as checked, per engine
GRAMMAR_CACHE_SIZE = 256
# Threads that compile matchers (llguidance releases the GIL while it compiles)
COMPILE_THREADS = 4


class StructuredOutputError(InferforgeError):
    """The constraint does not compile (a bad schema, regex or grammar): the request's fault."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as exc:  # a dependency of the package; only a broken install lacks it
        raise StructuredOutputError(
            "structured outputs need the llguidance package (pip install llguidance)"
        ) from exc
    return llguidance


def grammar_of(spec: StructuredOutput) -> str:
    """llguidance's grammar text for a constraint; StructuredOutputError says what is malformed."""
    matcher = _llguidance().LLMatcher
    if spec.kind == "json_object":
        return matcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
    if spec.kind == "json_schema":
        try:
            schema = json.loads(spec.spec)
        except json.JSONDecodeError as exc:
            raise StructuredOutputError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict | bool):
            raise StructuredOutputError("the JSON schema must be a JSON object")
        return matcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
    if spec.kind == "regex":
        return matcher.grammar_from_regex(spec.spec)
    if spec.kind == "choice":
        return matcher.grammar_from_lark(_choice_grammar(spec.spec))
    return matcher.grammar_from_lark(spec.spec)


def _choice_grammar(text: str) -> str:
    try:
        choices = json.loads(text)
    except json.JSONDecodeError:
        choices = None
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise StructuredOutputError("choice needs a non-empty list of non-empty strings")
    # JSON string literals are Lark string literals (same quotes and escapes)
    return "start: " + " | ".join(json.dumps(c) for c in choices)


def check(spec: StructuredOutput) -> None:
    """Compile the constraint without a tokenizer, so a server can refuse a bad one before it queues."""
    err = _llguidance().LLMatcher.validate_grammar(grammar_of(spec))
    if err:
        raise StructuredOutputError(f"the {spec.kind} constraint does not compile: {err.strip()}")


class GrammarCompiler:
    """One engine's matchers.

    Each sequence gets a matcher compiled from the grammar text of its own, not a deep copy of a shared one:
    llguidance's copies share their lazily built lexer states behind one lock, so their masks do not compute
    in parallel. On the H100 host (16 cores; `probe_grammar_threads.py`, S3 in docs/llm-runs.md), 64 rows of
    a JSON schema took 4.3-5.9 ms a step as copies at 1-16 threads, and 1.1-1.7 ms as separate matchers at
    8-16 threads (6.5 at one). A matcher compiles in ~0.9 ms there, with the GIL released: the compiles run
    on a small thread pool from `add_request` and are waited for only when the sequence is first sampled.
    A grammar text is checked once, synchronously (~0.4 ms), so a bad one is refused at once.
    """

    def __init__(self, hf_tokenizer: Any, vocab_size: int, eos_ids: set[int], pinned: bool = False) -> None:
        self._hf = hf_tokenizer
        self.vocab_size = vocab_size
        self.words = (vocab_size + 31) // 32
        self._eos = sorted(eos_ids)
        self._tokenizer: Any = None
        self._checked: OrderedDict[str, None] = OrderedDict()  # grammar texts known to compile
        self._executor: Any = None
        self._pool: ThreadPoolExecutor | None = None
        self._pinned = pinned
        self._buffers: list[torch.Tensor] = []  # two host mask buffers in turn (see `bitmask`)
        self._turn = 0

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from llguidance.hf import from_tokenizer

            try:
                eos = self._eos or None
                self._tokenizer = from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=eos)
            except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads only fast ones
                raise StructuredOutputError(f"structured outputs need a fast tokenizer: {exc}") from exc
        return self._tokenizer

    def matchers(self, spec: StructuredOutput, n: int) -> list[Future]:
        """n matchers in the grammar's start state, compiling in the background (`resolve` waits for one);
        StructuredOutputError at once if the grammar does not compile."""
        grammar = grammar_of(spec)
        llg = _llguidance()
        if grammar in self._checked:
            self._checked.move_to_end(grammar)
        else:
            bad, messages = llg.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
            if bad:
                why = messages[0].strip()
                raise StructuredOutputError(f"the {spec.kind} constraint does not compile: {why}")
            self._checked[grammar] = None
            if len(self._checked) > GRAMMAR_CACHE_SIZE:
                self._checked.popitem(last=False)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar")
        tokenizer = self.tokenizer
        return [self._pool.submit(llg.LLMatcher, tokenizer, grammar, log_level=0) for _ in range(n)]

    def bitmask(self, matchers: list[Any]) -> torch.Tensor:
        """The allowed next tokens of each row as bits ([rows, words] int32 on the host, pinned on CUDA
        engines; bit t % 32 of word t // 32); rows without a matcher allow everything. The tensor is one of
        two buffers used in turn: it stays valid until the call after next, by which time the engine has
        waited for the step whose copy read it."""
        rows = len(matchers)
        self._turn ^= 1
        if len(self._buffers) < 2 or self._buffers[0].shape[0] < rows:
            size = max(rows, 2 * self._buffers[0].shape[0] if self._buffers else 8)
            self._buffers = [torch.empty(size, self.words, dtype=torch.int32, pin_memory=self._pinned)
                             for _ in range(2)]  # fmt: skip
        out = self._buffers[self._turn][:rows]
        # numpy's fill, not torch's: a torch fill this size runs on OpenMP threads that then spin and take
        # the cores llguidance's threads need
        out.numpy().fill(-1)
        live = [(m, i) for i, m in enumerate(matchers) if m is not None]
        if len(live) == 1:
            m, i = live[0]
            m.unsafe_compute_mask_ptr(out[i].data_ptr(), self.words * 4)
        elif live:  # several constrained rows: llguidance's thread pool computes them in parallel
            if self._executor is None:
                self._executor = _llguidance().LLExecutor()
            self._executor.unsafe_compute_mask_ptr(live, out.data_ptr(), self.words * 4, rows)
        return out


def resolve(matcher: Any) -> Any:
    """A sequence's matcher, waiting for its compile if it is still a future; a matcher that failed to
    build (not expected after the grammar's check) raises StructuredOutputError."""
    if not isinstance(matcher, Future):
        return matcher
    m = matcher.result()
    if m.is_error():
        raise StructuredOutputError(f"the constraint did not compile: {m.get_error().strip()}")
    return m


def consume(matcher: Any, token: int) -> bool:
    """Advance a sequence's matcher by its sampled token; True when the grammar can take nothing more (the
    sequence is complete). A token the mask did not allow cannot be sampled; if the matcher still refuses
    one, the sequence ends rather than continue unconstrained."""
    if not matcher.consume_token(token):
        log.warning("structured output: the grammar refused token %d (%s)", token, matcher.get_error())
        return True
    return bool(matcher.is_stopped())


_SHIFTS: dict[torch.device, torch.Tensor] = {}


def allowed(bits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 bits on the device -> [rows, vocab_size] bool, True where a token may be
    sampled."""
    shifts = _SHIFTS.get(bits.device)
    if shifts is None:
        shifts = _SHIFTS[bits.device] = torch.arange(32, dtype=torch.int32, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.view(bits.shape[0], -1)[:, :vocab_size].bool()
