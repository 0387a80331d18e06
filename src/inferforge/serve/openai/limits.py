"""Caps the operator sets on what one request may ask for, so a single client cannot take the whole engine."""

from __future__ import annotations

from dataclasses import dataclass

from inferforge.serve.openai.tools import TOOL_CALL_PARSERS


@dataclass(frozen=True)
class ServerLimits:
    """Per-request caps; a request over any of them is answered 400 (413 for the body) naming the cap."""

    max_tokens_cap: int = 4096
    """Largest `max_tokens` / `max_completion_tokens` a request may ask for."""
    default_completion_max_tokens: int = 16
    """`max_tokens` of a completion request that gives none (OpenAI's default)."""
    max_n: int = 8
    """Largest `n` (sequences per prompt)."""
    max_logprobs: int = 20
    """Largest `logprobs` (completions) or `top_logprobs` (chat)."""
    max_prompt_tokens: int | None = None
    """Longest prompt in tokens; None means the model's context length less one generated token."""
    max_prompts: int = 64
    """Most prompts in one batched completion request."""
    max_stop: int = 4
    """Most stop strings per request."""
    max_body_bytes: int = 4 * 1024 * 1024
    """Largest request body; larger bodies get 413."""
    tool_call_parser: str | None = None
    """How "auto" tool calls are read from the model's text (`tools.TOOL_CALL_PARSERS`); None: "auto" is
    refused."""

    def __post_init__(self) -> None:
        for name in ("max_tokens_cap", "default_completion_max_tokens", "max_n", "max_prompts", "max_stop"):
            if getattr(self, name) < 1:
                raise ValueError(f"ServerLimits.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_logprobs <= 20:
            raise ValueError(
                f"ServerLimits.max_logprobs must be in [0, 20] (the engine's range), got {self.max_logprobs}"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(
                f"ServerLimits.max_prompt_tokens must be >= 1 or None, got {self.max_prompt_tokens}"
            )
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(
                f"ServerLimits.tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)} or None, "
                f"got {self.tool_call_parser!r}"
            )
        if self.max_body_bytes < 1024:
            raise ValueError(f"ServerLimits.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.default_completion_max_tokens > self.max_tokens_cap:
            raise ValueError(
                f"ServerLimits.default_completion_max_tokens ({self.default_completion_max_tokens}) exceeds "
                f"max_tokens_cap ({self.max_tokens_cap}); lower the default or raise the cap"
            )
