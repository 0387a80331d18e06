"""Turn a validated OpenAI request into engine requests, checking what only the server can check.

Pydantic has already enforced the static bounds; here come the operator's caps (`ServerLimits`), the model's
context length and vocabulary, and the features this engine lacks (answered 400, never silently ignored).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass, replace

from inferforge.llm.protocol import EngineClient, EngineRequest, SamplingParams, StructuredOutput
from inferforge.serve.openai.errors import APIError, bad_param
from inferforge.serve.openai.limits import ServerLimits
from inferforge.serve.openai.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from inferforge.serve.openai.structured import structured_output
from inferforge.serve.openai.tools import SPECIAL_TOKEN_PARSERS, ToolPlan, plan_tools


@dataclass(frozen=True)
class Plan:
    """What a route sends to the engine: one request per prompt, plus what the response needs to echo."""

    response_id: str
    requests: tuple[EngineRequest, ...]
    prompt_texts: tuple[str, ...]  # for `echo`; empty strings otherwise
    n: int
    logprobs: int | None
    tools: ToolPlan | None = None  # chat answers read as tool calls (`tools.py`)
    prompt_only: bool = False  # max_tokens 0 with echo: the answer is the prompt (and its logprobs)

    @property
    def first_ids(self) -> tuple[int, ...]:
        """Each prompt's first token (the echoed prompt's logprobs start with it, unscored)."""
        return tuple(r.prompt_ids[0] for r in self.requests)


def check_model(requested: str, served: str) -> None:
    if requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}' (see GET /v1/models).",
            param="model",
            code="model_not_found",
        )


def _check_unsupported(req: CompletionRequest | ChatCompletionRequest, limits: ServerLimits) -> None:
    if req.n > limits.max_n:
        raise bad_param(
            "n", f"n={req.n} exceeds this server's cap of {limits.max_n}; ask for fewer sequences."
        )
    if req.stream_options is not None and not req.stream:
        raise bad_param("stream_options", "stream_options is only allowed when stream is true.")


def _stops(stop: str | list[str] | None, limits: ServerLimits) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > limits.max_stop:
        raise bad_param("stop", f"{len(stops)} stop sequences given; at most {limits.max_stop} are allowed.")
    if any(s == "" for s in stops):
        raise bad_param("stop", "stop sequences must not be empty strings.")
    return tuple(stops)


def _check_prompt(ids: list[int], engine: EngineClient, limits: ServerLimits, param: str) -> None:
    if not ids:
        raise bad_param(param, "The prompt is empty; send at least one token.")
    bad = next((t for t in ids if not 0 <= t < engine.vocab_size), None)
    if bad is not None:
        raise bad_param(
            param,
            f"Token id {bad} is outside the vocabulary (valid ids are 0..{engine.vocab_size - 1}).",
            code="invalid_token_id",
        )
    cap = min(limits.max_prompt_tokens or engine.max_model_len, engine.max_model_len - 1)
    if len(ids) > cap:
        raise bad_param(
            param,
            f"The prompt has {len(ids)} tokens; this server accepts at most {cap} "
            f"(context length {engine.max_model_len}). Shorten the prompt.",
            code="context_length_exceeded",
        )


def _max_tokens(
    requested: int | None,
    default: int,
    prompt_len: int,
    engine: EngineClient,
    limits: ServerLimits,
    param: str,
) -> int:
    room = engine.max_model_len - prompt_len
    if requested is None:
        return max(1, min(default, limits.max_tokens_cap, room))
    if requested > limits.max_tokens_cap:
        raise bad_param(
            param,
            f"{param}={requested} exceeds this server's cap of {limits.max_tokens_cap}; ask for fewer.",
        )
    if requested > room:
        raise bad_param(
            param,
            f"This model's maximum context length is {engine.max_model_len} tokens; the prompt has "
            f"{prompt_len} and {param} asks for {requested} more. Lower {param} or shorten the prompt.",
            code="context_length_exceeded",
        )
    return requested


_MAX_LOGIT_BIAS = 300  # entries per request, as OpenAI's API


def _logit_bias(raw: dict[str, float] | None, vocab_size: int) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} as (id, bias) pairs; every key, value and count checked."""
    if not raw:
        return ()
    if len(raw) > _MAX_LOGIT_BIAS:
        raise bad_param(
            "logit_bias", f"logit_bias has {len(raw)} entries; at most {_MAX_LOGIT_BIAS} are allowed."
        )
    out = []
    for key, bias in raw.items():
        if not key.strip().lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
            raise bad_param(
                "logit_bias",
                f"logit_bias key {key!r} is not a token id of this model (ids are 0..{vocab_size - 1}).",
            )
        if not -100.0 <= bias <= 100.0:
            raise bad_param("logit_bias", f"logit_bias value {bias} for token {key} is outside [-100, 100].")
        out.append((int(key), float(bias)))
    return tuple(out)


def _params(
    req: CompletionRequest | ChatCompletionRequest,
    max_tokens: int,
    logprobs: int | None,
    stop: tuple[str, ...],
    logit_bias: tuple[tuple[int, float], ...] = (),
    structured: StructuredOutput | None = None,
    keep_special: bool = False,
) -> SamplingParams:
    """`structured`: the request's constraint, made once per request by the caller (`structured_output`
    compiles it). `keep_special`: special tokens' text stays in the output whatever the request says (a
    tool-call parser reads them)."""
    if req.min_tokens > max_tokens:
        raise bad_param(
            "min_tokens", f"min_tokens={req.min_tokens} exceeds max_tokens={max_tokens}; lower it."
        )
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        min_tokens=req.min_tokens,
        repetition_penalty=req.repetition_penalty,
        seed=req.seed,
        stop=stop,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos,
        n=req.n,
        logprobs=logprobs,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        logit_bias=logit_bias,
        structured=structured,
        skip_special_tokens=req.skip_special_tokens and not keep_special,
    )


def _prompt_ids(req: CompletionRequest, engine: EngineClient) -> tuple[list[list[int]], list[str]]:
    p = req.prompt
    if isinstance(p, str):
        return [engine.encode(p)], [p]
    if not p:
        raise bad_param("prompt", "The prompt list is empty; send a string, a list of strings or token ids.")
    if all(isinstance(x, str) for x in p):
        texts = [str(x) for x in p]
        return [engine.encode(t) for t in texts], texts
    if all(isinstance(x, int) for x in p):
        return [[int(x) for x in p]], [""]  # type: ignore[arg-type]
    return [[int(t) for t in x] for x in p], [""] * len(p)  # type: ignore[union-attr]


def plan_completion(req: CompletionRequest, engine: EngineClient, limits: ServerLimits, served: str) -> Plan:
    check_model(req.model, served)
    _check_unsupported(req, limits)
    if req.best_of is not None and req.best_of != req.n:
        raise bad_param("best_of", "best_of other than n is not supported; leave it unset.")
    if req.suffix:
        raise bad_param("suffix", "suffix (insertion) is not supported by this engine; remove it.")
    prompt_only = req.max_tokens == 0
    if prompt_only and not req.echo:
        raise bad_param(
            "max_tokens",
            "max_tokens=0 only scores the prompt: it needs echo=true (and logprobs for its logprobs).",
        )
    if req.logprobs is not None and req.logprobs > limits.max_logprobs:
        raise bad_param(
            "logprobs", f"logprobs={req.logprobs} exceeds this server's cap of {limits.max_logprobs}."
        )
    stop = _stops(req.stop, limits)
    bias = _logit_bias(req.logit_bias, engine.vocab_size)
    structured = structured_output(req)
    prompts, texts = _prompt_ids(req, engine)
    if len(prompts) > limits.max_prompts:
        raise bad_param(
            "prompt", f"{len(prompts)} prompts in one request; at most {limits.max_prompts} allowed."
        )
    rid = f"cmpl-{uuid.uuid4().hex}"
    reqs = []
    for i, ids in enumerate(prompts):
        _check_prompt(ids, engine, limits, "prompt")
        mt = (
            1
            if prompt_only
            else _max_tokens(
                req.max_tokens, limits.default_completion_max_tokens, len(ids), engine, limits, "max_tokens"
            )
        )  # prompt only: one token is computed (the engine makes at least one) and not returned
        params = _params(req, mt, req.logprobs, stop, bias, structured)
        if req.echo and req.logprobs is not None:  # the echoed prompt's logprobs too (OpenAI's legacy API)
            params = replace(params, prompt_logprobs=req.logprobs)
        reqs.append(EngineRequest(f"{rid}-{i}", tuple(ids), params, req.cache_salt))
    echo = tuple(t if req.echo else "" for t in texts)
    if req.echo and any(not t for t in texts):
        echo = tuple(engine.decode(list(r.prompt_ids)) for r in reqs)
    return Plan(rid, tuple(reqs), echo, req.n, req.logprobs, prompt_only=prompt_only)


def tokenize(req: TokenizeRequest, engine: EngineClient, served: str) -> list[int]:
    """The ids the completion or chat route would send to the engine for this prompt or these messages."""
    if req.model is not None:
        check_model(req.model, served)
    if (req.prompt is None) == (req.messages is None):
        raise bad_param("prompt", "send either prompt (a string) or messages, not both and not neither.")
    if req.prompt is not None:
        return list(engine.encode(req.prompt))
    if not req.add_generation_prompt:
        raise bad_param(
            "add_generation_prompt", "only add_generation_prompt=true is supported (as the chat route)."
        )
    return _chat_ids(req, engine)


def detokenize(req: DetokenizeRequest, engine: EngineClient, served: str) -> str:
    if req.model is not None:
        check_model(req.model, served)
    bad = next((t for t in req.tokens if t >= engine.vocab_size), None)
    if bad is not None:
        raise bad_param(
            "tokens",
            f"Token id {bad} is outside the vocabulary (valid ids are 0..{engine.vocab_size - 1}).",
            code="invalid_token_id",
        )
    return engine.decode(list(req.tokens))


def _chat_ids(
    req: ChatCompletionRequest | TokenizeRequest, engine: EngineClient, tools: list[dict] | None = None
) -> list[int]:
    try:
        return list(engine.apply_chat_template(_messages(req), tools))
    except APIError:
        raise
    except Exception as exc:  # the template is user-facing code (jinja); its errors are the request's fault
        raise bad_param("messages", f"the chat template rejected these messages: {exc}") from exc


def _messages(req: ChatCompletionRequest | TokenizeRequest) -> list[dict]:
    out = []
    for i, m in enumerate(req.messages or ()):
        content = m.content
        if isinstance(content, list):
            texts = []
            for part in content:
                if part.type != "text" or part.text is None:
                    raise bad_param(
                        f"messages[{i}].content",
                        f"content part of type '{part.type}' is not supported; send text.",
                    )
                texts.append(part.text)
            content = "".join(texts)
        role = "system" if m.role == "developer" else m.role
        msg: dict = {"role": role, "content": content or ""}
        if m.tool_calls:
            msg["tool_calls"] = [_call_for_template(c) for c in m.tool_calls]
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


def _call_for_template(call: dict) -> dict:
    """An assistant turn's tool call as chat templates expect it: arguments as an object (OpenAI sends them
    as JSON text)."""
    fn = dict(call.get("function") or {})
    if isinstance(fn.get("arguments"), str):
        with contextlib.suppress(ValueError):  # else left as text; the template renders what it is given
            fn["arguments"] = json.loads(fn["arguments"])
    return {**call, "function": fn}


def plan_chat(req: ChatCompletionRequest, engine: EngineClient, limits: ServerLimits, served: str) -> Plan:
    check_model(req.model, served)
    _check_unsupported(req, limits)
    tools, tool_plan, tool_spec = plan_tools(req, limits.tool_call_parser)
    structured = structured_output(req)
    if tool_spec is not None and structured is not None:
        raise bad_param("tool_choice", "give forced tool calls or a structured-output constraint, not both.")
    if req.top_logprobs is not None and not req.logprobs:
        raise bad_param("top_logprobs", "top_logprobs needs logprobs set to true.")
    if req.top_logprobs is not None and req.top_logprobs > limits.max_logprobs:
        raise bad_param(
            "top_logprobs",
            f"top_logprobs={req.top_logprobs} exceeds this server's cap of {limits.max_logprobs}.",
        )
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise bad_param("max_tokens", "give max_completion_tokens or max_tokens, not both.")
    stop = _stops(req.stop, limits)
    bias = _logit_bias(req.logit_bias, engine.vocab_size)
    ids = _chat_ids(req, engine, tools)
    _check_prompt(ids, engine, limits, "messages")
    param = "max_tokens" if req.max_tokens is not None else "max_completion_tokens"
    requested = req.max_tokens if req.max_tokens is not None else req.max_completion_tokens
    mt = _max_tokens(requested, limits.max_tokens_cap, len(ids), engine, limits, param)
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    keep_special = tool_plan is not None and tool_plan.parser in SPECIAL_TOKEN_PARSERS
    params = _params(req, mt, logprobs, stop, bias, tool_spec or structured, keep_special)
    request = EngineRequest(f"{rid}-0", tuple(ids), params, req.cache_salt)
    return Plan(rid, (request,), ("",), req.n, logprobs, tool_plan)
