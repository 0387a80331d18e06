"""A small `EngineClient` for unit tests of request parsing and SSE framing only (never for end-to-end tests).

Byte-level "tokenizer" (id = byte value + 1, 0 is end-of-sequence) and a deterministic generator that cycles
through the lowercase alphabet, so expected outputs follow from the rules here rather than being hand-written.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from inferforge.llm.protocol import EngineOutput, EngineRequest, EngineStats, RequestTiming, TokenLogprob


class FakeEngine:
    model_name = "fake"
    max_model_len = 64
    vocab_size = 257

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.active: set[str] = set()
        self.aborted: list[str] = []
        self.seen: list[EngineRequest] = []
        self.generated = 0

    def encode(self, text: str) -> list[int]:
        return [b + 1 for b in text.encode()]

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t - 1 for t in token_ids if t > 0).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        names = "".join(f"<tool:{t['function']['name']}>" for t in tools or ())
        return self.encode(names + "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")

    def next_token(self, step: int, seq: int) -> int:
        return ord("a") + (step + seq) % 26 + 1

    async def generate(self, request: EngineRequest) -> AsyncIterator[EngineOutput]:
        self.seen.append(request)
        self.active.add(request.request_id)
        p = request.params
        t0 = time.monotonic()
        try:
            for step in range(p.max_tokens):
                await asyncio.sleep(self.delay_s)
                if request.request_id in self.aborted:
                    return
                for seq in range(p.n):
                    tok = self.next_token(step, seq)
                    lps = None
                    if p.logprobs is not None:
                        top = tuple((tok + k, -0.5 - k) for k in range(p.logprobs))
                        lps = (TokenLogprob(tok, -0.5, top),)
                    last = step == p.max_tokens - 1
                    self.generated += 1
                    now = time.monotonic()
                    yield EngineOutput(
                        request.request_id,
                        seq,
                        (tok,),
                        self.decode([tok]),
                        lps,
                        last,
                        "length" if last else None,
                        len(request.prompt_ids),
                        step + 1,
                        RequestTiming(t0, t0, now if step == 0 else t0 + 1e-3, now if last else None),
                    )
        finally:
            self.active.discard(request.request_id)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.active.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.active), 0, 100, 2 * len(self.active), self.generated)

    async def shutdown(self, grace_s: float) -> None:
        return None
