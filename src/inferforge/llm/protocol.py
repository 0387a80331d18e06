"""Typed messages between the LLM engine and whatever drives it (the OpenAI server, the CLI, benchmarks).

The HTTP layer depends only on these and on `EngineClient`; it never reaches into the engine's scheduler or
cache.
No web framework may be imported here or anywhere under `inferforge.llm`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]
StructuredKind = Literal["json_object", "json_schema", "regex", "choice", "grammar"]
STRUCTURED_KINDS: tuple[str, ...] = ("json_object", "json_schema", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint every sampled token must keep satisfiable (vLLM's structured outputs): the output is a
    JSON object (`json_object`), JSON valid under a schema (`json_schema`: the schema as JSON text), a full
    match of a regular expression (`regex`, Rust regex syntax), one of several strings (`choice`: a JSON list
    of strings) or a sentence of a Lark grammar (`grammar`). Compiled by `inferforge.llm.structured`."""

    kind: StructuredKind
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise ValueError(f"structured output kind must be one of {STRUCTURED_KINDS}, got {self.kind!r}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"structured output of kind {self.kind!r} needs a non-empty spec")


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; validated at construction so bad values never reach the engine loop."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means off
    min_p: float = 0.0  # vLLM's: drop tokens less likely than min_p times the most likely one; 0 means off
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None  # number of top alternatives to return per token; None means no logprobs
    # OpenAI's: subtracted from the logit of every token already in the output, once (presence) and per
    # occurrence (frequency); the prompt does not count (as in vLLM)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit, in [-100, 100])
    # vLLM's: no end-of-sequence or stop token, and no stop-string check, before this many output tokens
    min_tokens: int = 0
    # False: outputs carry token ids only (new_text ""); whoever reads them makes the text (the OpenAI
    # server's workers do, so the engine process spends its one core on steps). Stop strings need it True.
    detokenize: bool = True
    # Constrained decoding (JSON, regex, choice, grammar); None: free text
    structured: StructuredOutput | None = None
    # vLLM's: every prompt token's logprob (and this many alternatives) on each sequence's first output;
    # None: off. The prompt is then computed whole (no prefix-cache reads).
    prompt_logprobs: int | None = None
    # vLLM's: False keeps special tokens' text in the output (a parser of a tool-call syntax written with
    # control tokens, Mistral's `[TOOL_CALLS]`, needs to see them)
    skip_special_tokens: bool = True

    @property
    def needs_history(self) -> bool:
        """Penalties and min_tokens read the tokens so far: the newest must be on the host before the next
        step's sampling parameters are staged. (Structured output needs it before the next sampling only,
        which the engine reads while that step's forward pass runs: `LLMEngine._launch`.)"""
        penalties = self.repetition_penalty != 1.0 or self.output_penalties
        return penalties or self.min_tokens > 0  # min_tokens: whether to ban stop tokens depends on the count

    @property
    def output_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError(f"temperature must be in [0, 2], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.stop and not self.detokenize:
            raise ValueError("stop strings need detokenize=True: the engine finds them in the text")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}]: {self.min_tokens}")
        for token, bias in self.logit_bias:
            if token < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias needs ids >= 0 and biases in [-100, 100], got {token}: {bias}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}")


@dataclass(frozen=True)
class EngineRequest:
    """One prompt, already tokenized, and how to sample it."""

    request_id: str
    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    # Prefix caching shares cached prompt blocks only between requests with the same salt (vLLM's
    # `cache_salt`): a tenant that salts its requests cannot learn from time to first token whether another
    # tenant sent the same prompt start.
    cache_salt: str | None = None

    def __post_init__(self) -> None:
        if self.cache_salt is not None and not self.cache_salt:
            raise ValueError("cache_salt must be a non-empty string or None")


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token_id, logprob) of the most likely alternatives


@dataclass(frozen=True)
class PromptScores:
    """Prompt tokens 1.. with their logprobs (`SamplingParams.prompt_logprobs`) in flat columns; iterating
    or indexing gives `TokenLogprob`s. Flat columns of numbers, because an object per token (or a list per
    token) cost the one engine process most of a 64 x 512-token scoring batch: 187 ms of 295, much of it in
    the garbage collector walking the heap as the objects piled up (S14 in docs/llm-runs.md). Numbers are
    not tracked by the collector, pickle across the server's process boundary quickly, and the HTTP
    workers build what they render."""

    token_ids: list[int]
    logprobs: list[float]
    k: int = 0  # alternatives a token
    top_ids: list[int] = field(default_factory=list)  # token j's alternatives at [j * k, (j + 1) * k)
    top_logprobs: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.token_ids)

    def __getitem__(self, j: int) -> TokenLogprob:
        a, b = j * self.k, (j + 1) * self.k
        alts = tuple(zip(self.top_ids[a:b], self.top_logprobs[a:b], strict=True))
        return TokenLogprob(self.token_ids[j], self.logprobs[j], alts)

    def __iter__(self) -> Iterator[TokenLogprob]:
        return (self[j] for j in range(len(self)))


# RequestTiming and EngineOutput are made per row per step: plain slotted dataclasses construct in 0.3 us
# where frozen ones take 0.8 and 1.5 (CPU box), ~115 us of a 64-row decode step's host work. Treat them
# as read-only all the same.
@dataclass(slots=True)
class RequestTiming:
    """Seconds on the engine's monotonic clock; the server turns them into histograms and response headers."""

    arrival: float
    scheduled: float | None = None  # left the waiting queue
    first_token: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class EngineOutput:
    """A delta for one of a request's `n` sequences: the tokens and text produced since the last output."""

    request_id: str
    index: int  # which of the n sequences
    new_token_ids: tuple[int, ...]
    new_text: str
    logprobs: tuple[TokenLogprob, ...] | None
    finished: bool
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int  # total so far for this sequence
    timing: RequestTiming
    # `SamplingParams.prompt_logprobs`: prompt tokens 1.. with their logprobs, on a sequence's first output
    prompt_logprobs: PromptScores | None = None


def merge_outputs(first: EngineOutput, then: EngineOutput) -> EngineOutput:
    """One delta for two consecutive deltas of the same sequence (`first` unfinished): one chunk to send
    where a slow reader, or a stream interval, would otherwise send two."""
    lps = None if then.logprobs is None else (first.logprobs or ()) + then.logprobs
    return EngineOutput(then.request_id, then.index, first.new_token_ids + then.new_token_ids,
                        first.new_text + then.new_text, lps, then.finished, then.finish_reason,
                        then.prompt_tokens, then.completion_tokens, then.timing,
                        first.prompt_logprobs or then.prompt_logprobs)  # fmt: skip


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    generated_tokens_total: int
    # Seconds the engine loop spent blocked on the device (reading a step back): where it is small against
    # the loop's wall time, the host, not the GPU, sets the pace.
    device_wait_s_total: float = 0.0
    # Seconds of the loop that drives the engine, by phase, since it started (the process engine's child:
    # step, ipc_in, ipc_out, idle); empty where nothing measures them.
    loop_seconds: tuple[tuple[str, float], ...] = ()
    prefix_cached_tokens_total: int = 0  # prompt tokens taken from the prefix cache instead of computed
    preemptions_total: int = 0  # running requests sent back to wait because the KV cache was full
    recomputed_tokens_total: int = 0  # tokens computed again when preempted requests were readmitted
    spec_draft_tokens_total: int = 0  # tokens proposed by prompt lookup (speculative decoding)
    spec_accepted_tokens_total: int = 0  # of those, tokens the model agreed with


class EngineClient(Protocol):
    """What a server may use of an engine. Cancelling the iterator (client gone) aborts the request and frees
    it."""

    model_name: str
    max_model_len: int
    vocab_size: int

    def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]: ...

    async def abort(self, request_id: str) -> None: ...

    def stats(self) -> EngineStats: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]: ...

    async def shutdown(self, grace_s: float) -> None: ...
