"""Closed-loop load test of an OpenAI-compatible server.

`concurrency` workers each stream one request after another, bounded by a request count and a duration. It
measures what a client sees: time to first token, inter-token gaps, generated tokens per second.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inferforge.errors import DataError, InferforgeError


@dataclass(frozen=True)
class LoadTestConfig:
    url: str
    concurrency: int = 8
    """Simultaneous streams (closed loop: each starts its next request when the last ends)."""
    max_tokens: int = 128
    requests: int = 256
    """Stop after this many requests have been started."""
    duration_s: float = 60.0
    """Stop starting requests after this many seconds; in-flight ones still finish (with a timeout)."""
    model: str | None = None
    """Model name to send; None asks /v1/models."""
    api_key: str | None = None
    ignore_eos: bool = False
    """Ask the server to ignore end-of-sequence so every request generates exactly max_tokens."""
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise InferforgeError(f"--url must start with http:// or https://, got {self.url!r}")
        for name in ("concurrency", "max_tokens", "requests"):
            if getattr(self, name) < 1:
                raise InferforgeError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.duration_s <= 0 or self.timeout_s <= 0:
            raise InferforgeError("--duration and the request timeout must be > 0 seconds")


@dataclass
class Sample:
    ok: bool
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str = ""
    ended_at: float = 0.0
    """Unix time of the answer's last line: when the client had all of it (not counting its own teardown)."""


def read_prompts(path: Path) -> list[dict[str, Any]]:
    """JSONL: each line a string, {"prompt": ...} (string or token ids) or {"messages": [...]}."""
    if not path.is_file():
        raise DataError(f"--prompts {path}: no such file; give a JSONL file with one prompt per line")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"--prompts {path}:{i}: not JSON ({exc.msg})") from exc
        if isinstance(row, str):
            row = {"prompt": row}
        if not isinstance(row, dict) or not ({"prompt", "messages"} & row.keys()):
            raise DataError(
                f"--prompts {path}:{i}: expected a string or an object with 'prompt' or 'messages'"
            )
        out.append(row)
    if not out:
        raise DataError(f"--prompts {path}: the file has no prompts")
    return out


async def _one(client: Any, cfg: LoadTestConfig, model: str, row: dict[str, Any]) -> Sample:
    chat = "messages" in row
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": cfg.max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
    }
    if cfg.ignore_eos:
        body["ignore_eos"] = True
    body.update({"messages": row["messages"]} if chat else {"prompt": row["prompt"]})
    path = "/v1/chat/completions" if chat else "/v1/completions"
    start = time.perf_counter()
    last, s = None, Sample(ok=False)
    async with client.stream("POST", path, json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return Sample(ok=False, error=f"HTTP {resp.status_code}: {resp.text[:200]}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return Sample(ok=False, error=str(chunk["error"].get("message")))
            if chunk.get("usage"):
                s.tokens = chunk["usage"]["completion_tokens"]
            for c in chunk.get("choices", []):
                delta = c.get("delta", {})
                if chat and "role" in delta and not delta.get("content"):
                    continue  # the opening role chunk carries no token
                # one chunk per engine delta; its text may be empty (a partial UTF-8 character)
                now = time.perf_counter()
                if last is None:
                    s.ttft = now - start
                else:
                    s.itl.append(now - last)
                last = now
    s.ok, s.ended_at = True, time.time()
    return s


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(q * (len(v) - 1) + 0.5))]


async def run(cfg: LoadTestConfig, prompts: list[dict[str, Any]]) -> dict[str, Any]:
    samples, elapsed = await run_samples(cfg, prompts)
    return summarize(samples, elapsed, cfg)


async def run_samples(
    cfg: LoadTestConfig, prompts: list[dict[str, Any]], start_at: float | None = None
) -> tuple[list[Sample], float]:
    """Samples and the seconds from the first request to the last answer. `start_at` (Unix time): open
    `concurrency` connections and look the model up first, then wait for that moment, so that several load
    processes start together and none of their set-up is timed."""
    import httpx

    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency + 4, max_keepalive_connections=cfg.concurrency + 4)
    async with httpx.AsyncClient(
        base_url=cfg.url.rstrip("/"), headers=headers, limits=limits, timeout=cfg.timeout_s
    ) as client:
        model = cfg.model
        if model is None:
            r = await client.get("/v1/models")
            if r.status_code != 200:
                raise InferforgeError(f"GET {cfg.url}/v1/models answered {r.status_code}: {r.text[:200]}")
            model = r.json()["data"][0]["id"]
        if start_at is not None:
            await asyncio.gather(*(client.get("/health") for _ in range(cfg.concurrency)))
            await asyncio.sleep(max(0.0, start_at - time.time()))
        samples: list[Sample] = []
        started = 0
        t0 = time.perf_counter()
        deadline = t0 + cfg.duration_s

        async def worker() -> None:
            nonlocal started
            while started < cfg.requests and time.perf_counter() < deadline:
                row = prompts[started % len(prompts)]
                started += 1
                try:
                    samples.append(await _one(client, cfg, model, row))
                except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
                    samples.append(Sample(ok=False, error=f"{type(exc).__name__}: {exc}"))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))
        elapsed = time.perf_counter() - t0
    return samples, elapsed


def summarize(samples: list[Sample], elapsed: float, cfg: LoadTestConfig) -> dict[str, Any]:
    ok = [s for s in samples if s.ok]
    ttft = [s.ttft for s in ok]
    itl = [g for s in ok for g in s.itl]
    tokens = sum(s.tokens for s in ok)
    errors = [s.error for s in samples if not s.ok]
    ms = 1e3
    return {
        "config": asdict(cfg) | {"api_key": None},
        "requests": len(samples),
        "ok": len(ok),
        "errors": len(errors),
        "error_examples": errors[:5],
        "elapsed_s": elapsed,
        "requests_per_s": len(ok) / elapsed,
        "generated_tokens": tokens,
        "generated_tokens_per_s": tokens / elapsed,
        "ttft_ms": {f"p{q}": _pct(ttft, q / 100) * ms for q in (50, 90, 99)},
        "itl_ms": {f"p{q}": _pct(itl, q / 100) * ms for q in (50, 90, 99)},
    }
