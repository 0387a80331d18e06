"""Request bodies of the OpenAI routes: unknown fields tolerated (`extra="allow"`), known ones bounded.

Static bounds (temperature in [0, 2], ...) live here; caps the operator sets (max_tokens, n, logprobs) are
checked against `ServerLimits` in `convert.py`, since they are not known when the class is defined.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

NonNegInt = Annotated[int, Field(ge=0)]
PromptType = str | list[str] | list[NonNegInt] | list[list[NonNegInt]]


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Open):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(_Open):
    """Fields of both routes; `top_k`, `min_p`, `repetition_penalty`, `ignore_eos` etc. are vLLM's
    extensions."""

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1)] = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    min_tokens: NonNegInt = 0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    stop_token_ids: list[NonNegInt] | None = None
    cache_salt: Annotated[str, Field(min_length=1, max_length=1024)] | None = None
    # structured outputs (`serve/openai/structured.py`): OpenAI's, vLLM's, vLLM's older spellings
    response_format: dict | None = None
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    # 0 with echo: score the prompt only (OpenAI's legacy form; `convert.plan_completion`)
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    best_of: Annotated[int, Field(ge=1)] | None = None
    suffix: str | None = None


class TextPart(_Open):
    type: str
    text: str | None = None


class ChatMessage(_Open):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant turn's calls, passed to the chat template
    tool_call_id: str | None = None  # a tool turn's answer to that call


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # `serve/openai/tools.py`: "none", "required" or a named function
    parallel_tool_calls: bool | None = None


class TokenizeRequest(_Open):
    """vLLM's /tokenize: a prompt string, or chat messages rendered as /v1/chat/completions renders them."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True


class DetokenizeRequest(_Open):
    model: str | None = None
    tokens: list[NonNegInt]
