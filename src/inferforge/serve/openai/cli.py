"""`inferforge serve-llm` and `inferforge loadtest-llm`. Heavy imports happen inside the commands."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from inferforge.errors import InferforgeError

if TYPE_CHECKING:
    from inferforge.llm.protocol import EngineClient


def read_api_keys(path: Path | None) -> set[str] | None:
    """One key per line; blank lines and lines starting with '#' are skipped."""
    if path is None:
        return None
    if not path.is_file():
        raise InferforgeError(f"--api-key-file {path}: no such file; write one API key per line")
    keys = {ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()}
    keys = {k for k in keys if k and not k.startswith("#")}
    if not keys:
        raise InferforgeError(f"--api-key-file {path}: the file holds no keys; write one API key per line")
    return keys


def _limits(**kwargs: object):  # -> ServerLimits
    from inferforge.serve.openai.limits import ServerLimits

    try:
        return ServerLimits(**kwargs)  # type: ignore[arg-type]
    except ValueError as exc:
        flag = str(exc).split(" ")[0].removeprefix("ServerLimits.").replace("_", "-")
        raise InferforgeError(f"--{flag}: {exc}") from exc


def auto_api_server_count(device: str, engine_mode: str, cores: int) -> int:
    """HTTP workers when the operator leaves it to us: on a GPU the engine outruns one HTTP process (I9:
    0.76 of the engine loop with one; J4 and J6: 0.94 in a closed loop with four, H100 box, 16 cores); on a
    CPU the engine is the bottleneck and extra processes only take its cores."""
    if engine_mode != "process" or not device.startswith("cuda"):
        return 1
    return max(1, min(4, cores // 4))


def parse_token_buckets(text: str, flag: str) -> tuple[int, ...]:
    """Parse a flag's "128,256" into (128, 256); "none" or "" into ()."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        buckets = tuple(sorted({int(x) for x in text.split(",")}))
    except ValueError:
        raise InferforgeError(f"{flag} takes comma-separated token counts or none, got {text!r}") from None
    if buckets[0] < 1:
        raise InferforgeError(f"{flag}: token counts must be positive, got {text!r}")
    return buckets


def serve_llm(
    model_dir: Path = typer.Argument(
        ..., help="Hugging Face model folder (config.json, safetensors, tokenizer)."
    ),
    host: str = typer.Option("127.0.0.1", help="Address to bind."),
    port: int = typer.Option(8000, min=0, max=65535, help="Port to bind."),
    device: str = typer.Option("cuda", help="cuda, cuda:N or cpu."),
    quant: str = typer.Option("none", help="Weight-only quantization (CUDA): none, int8, fp8 or int4."),
    api_key_file: Path | None = typer.Option(None, help="File with one API key per line; none means open."),
    served_model_name: str | None = typer.Option(
        None, help="Model name clients send; default: the engine's."
    ),
    max_num_seqs: int = typer.Option(64, min=1, help="Most sequences in the running batch."),
    max_model_len: int | None = typer.Option(None, min=2, help="Context length; default: the model's."),
    max_waiting: int = typer.Option(1024, min=1, help="Waiting-queue bound; beyond it requests get 429."),
    max_num_batched_tokens: int = typer.Option(
        8192,
        min=1,
        help="Tokens per engine step (decode rows + prompt chunks). Larger: a burst's prompts in fewer steps "
        "(more tokens/s), while running streams wait longer between tokens during those steps.",
    ),
    admit_delay_steps: int = typer.Option(
        0, min=0, help="Steps an arriving prompt may wait while others decode, to share one prompt step."
    ),
    enable_prefix_caching: bool = typer.Option(
        True, help="Reuse the KV blocks of earlier prompts that start with the same tokens."
    ),
    preemption: bool = typer.Option(
        True,
        help="Give a request KV blocks as it grows and, when they run out, preempt the newest one and "
        "compute it again later (vLLM's policy). --no-preemption reserves prompt + max_tokens per request at "
        "admission: no recompute, but fewer requests fit when max_tokens is large.",
    ),
    speculative_tokens: int = typer.Option(
        0,
        min=0,
        max=16,
        help="Speculative decoding by prompt lookup: while at most --speculative-max-batch greedy requests "
        "decode, draft up to this many tokens a step from their own context and verify them in one pass "
        "(the tokens are greedy decoding's). 0 is off.",
    ),
    speculative_max_batch: int = typer.Option(4, min=1, help="Most decoding requests for speculation."),
    prefix_cache_per_key: bool = typer.Option(
        True,
        help="With --api-key-file: requests share cached prompt blocks only with requests of the same key, "
        "so no key can time what prompt starts another sent. --no-prefix-cache-per-key shares them across "
        "keys.",
    ),
    max_tokens_cap: int = typer.Option(4096, min=1, help="Largest max_tokens a request may ask for."),
    max_n: int = typer.Option(8, min=1, help="Largest n per request."),
    max_logprobs: int = typer.Option(20, min=0, max=20, help="Largest logprobs / top_logprobs."),
    max_prompt_tokens: int | None = typer.Option(None, min=1, help="Longest prompt; default: the context."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, min=1024, help="Largest request body (413 beyond)."),
    drain_timeout: float = typer.Option(30.0, min=0.0, help="Seconds in-flight requests get after SIGTERM."),
    tool_call_parser: str | None = typer.Option(
        None,
        help="How tool_choice 'auto' reads tool calls from the model's text (as vLLM's flag): hermes "
        '(<tool_call> JSON blocks: Hermes, Qwen2.5), llama3_json ({"name", "parameters"} objects: '
        "Llama 3.1-3.3) or mistral ([TOOL_CALLS] and a JSON list, or name[ARGS]{...}: Mistral). Without it "
        "'auto' is refused; 'required' and a named function work either way.",
    ),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    engine_mode: str = typer.Option(
        "process", help="process: the engine steps in a child process; thread: in this one (shares the GIL)."
    ),
    switch_interval_ms: float = typer.Option(
        5.0, min=0.05, max=100.0, help="Python's GIL switch interval (5 is Python's default)."
    ),
    stream_interval: int = typer.Option(
        1,
        min=1,
        help="Tokens per streamed chunk after a sequence's first (as vLLM's flag). Larger: fewer socket "
        "writes and less server CPU per token, burstier streams; the first token is never held back.",
    ),
    prefill_graph_tokens: str = typer.Option(
        "128,256,384,512,768,1024,1536,2048,4096,8192",
        help="Token buckets of the CUDA graphs of prompt steps, comma-separated, or none. A prompt step up "
        "to the largest replays one graph instead of ~10 eager kernel launches a layer; buckets past "
        "--max-num-batched-tokens are not captured.",
    ),
    align_prompt_steps: bool = typer.Option(
        True,
        help="Cut a prompt step that fits no graph bucket to the largest bucket below it (the rest of its "
        "prompts wait a step) rather than running it eagerly; long prompts are never cut.",
    ),
    api_server_count: int = typer.Option(
        0,
        min=0,
        max=64,
        help="HTTP worker processes in front of the one engine process (as vLLM's flag). More than one "
        "spreads the per-request and per-chunk CPU work over cores; needs --engine-mode process. 0: auto, "
        "one per 4 cores up to 4 on a CUDA device in process mode (4 measured 0.94 of the engine loop "
        "on the H100 box, one 0.76), else 1.",
    ),
) -> None:
    """Serve an LLM with an OpenAI-compatible API (/v1/completions, /v1/chat/completions, /v1/models)."""
    keys = read_api_keys(api_key_file)
    limits = _limits(
        max_tokens_cap=max_tokens_cap,
        default_completion_max_tokens=min(16, max_tokens_cap),
        max_n=max_n,
        max_logprobs=max_logprobs,
        max_prompt_tokens=max_prompt_tokens,
        max_body_bytes=max_body_bytes,
        tool_call_parser=tool_call_parser,
    )
    if engine_mode not in ("thread", "process"):
        raise InferforgeError(f"--engine-mode must be thread or process, got {engine_mode!r}")
    if api_server_count == 0:
        api_server_count = auto_api_server_count(device, engine_mode, os.cpu_count() or 1)
    if api_server_count > 1 and engine_mode != "process":
        raise InferforgeError(
            f"--api-server-count {api_server_count} needs --engine-mode process: workers share one engine "
            "process"
        )
    if not model_dir.is_dir():
        raise InferforgeError(f"MODEL_DIR {model_dir}: not a folder; give a Hugging Face model folder")
    from inferforge.serve.openai.server import serve

    engine_config: dict[str, Any] = {
        "device": device,
        "quant": None if quant == "none" else quant,
        "max_num_seqs": max_num_seqs,
        "max_model_len": max_model_len,
        "max_waiting": max_waiting,
        "max_num_batched_tokens": max_num_batched_tokens,
        "admit_delay_steps": admit_delay_steps,
        "enable_prefix_caching": enable_prefix_caching,
        "reserve_full_budget": not preemption,
        "speculative_tokens": speculative_tokens,
        "speculative_max_batch": speculative_max_batch,
        "prefill_graph_tokens": parse_token_buckets(prefill_graph_tokens, "--prefill-graph-tokens"),
        "align_prompt_steps": align_prompt_steps,
    }
    http: dict[str, Any] = {
        "host": host,
        "port": port,
        "model_name": served_model_name,
        "limits": limits,
        "api_keys": keys,
        "drain_timeout": drain_timeout,
        "log_level": log_level,
        "switch_interval_ms": switch_interval_ms,
        "stream_interval": stream_interval,
        "prefix_cache_per_key": prefix_cache_per_key,
    }
    if api_server_count > 1:
        from inferforge.serve.openai.workers import serve_workers

        code = serve_workers(str(model_dir), engine_config, api_server_count, **http)
        if code:
            raise typer.Exit(code)
        return
    engine: EngineClient
    if engine_mode == "process":
        from inferforge.serve.openai.engine_process import ProcessEngine

        engine = ProcessEngine(model_dir, **engine_config)
    else:
        from inferforge.llm.async_engine import AsyncLLMEngine

        engine = AsyncLLMEngine.from_pretrained(str(model_dir), **engine_config)
        print(f"inferforge engine: {engine.engine.kernel_summary()}", file=sys.stderr, flush=True)
    serve(engine, **http)


def loadtest_llm(
    url: str = typer.Argument(..., help="Server base URL, e.g. http://127.0.0.1:8000"),
    concurrency: int = typer.Option(8, min=1, max=4096, help="Simultaneous streams (closed loop)."),
    prompts: Path | None = typer.Option(None, help="JSONL prompts; default: synthetic token-id prompts."),
    prompt_len: int = typer.Option(
        128, min=1, help="Length of synthetic prompts in tokens (without --prompts)."
    ),
    shared_prefix_len: int = typer.Option(
        0,
        min=0,
        help="Synthetic prompts: how many of their first tokens all share (a system prompt; the server's "
        "prefix cache serves them). 0: every prompt distinct from its first token.",
    ),
    max_tokens: int = typer.Option(128, min=1, help="max_tokens per request."),
    requests: int = typer.Option(256, min=1, help="Stop after this many requests."),
    duration: float = typer.Option(60.0, min=0.1, help="Stop starting requests after this many seconds."),
    ignore_eos: bool = typer.Option(False, help="Generate exactly max_tokens per request."),
    api_key_file: Path | None = typer.Option(None, help="File whose first key is sent as the bearer token."),
    model: str | None = typer.Option(None, help="Model name; default: the first from /v1/models."),
    json_out: Path | None = typer.Option(None, help="Write the full report as JSON here."),
) -> None:
    """Load-test an OpenAI-compatible server and print requests/s, tokens/s, TTFT and inter-token latency."""
    from inferforge.serve.openai.loadtest import LoadTestConfig, read_prompts, run

    keys = read_api_keys(api_key_file)
    cfg = LoadTestConfig(
        url=url,
        concurrency=concurrency,
        max_tokens=max_tokens,
        requests=requests,
        duration_s=duration,
        model=model,
        api_key=sorted(keys)[0] if keys else None,
        ignore_eos=ignore_eos,
    )
    if shared_prefix_len > prompt_len:
        raise InferforgeError(f"--shared-prefix-len {shared_prefix_len} exceeds --prompt-len {prompt_len}")
    count = min(requests, SYNTHETIC_DISTINCT)
    rows = read_prompts(prompts) if prompts else synthetic_prompts(prompt_len, count, shared_prefix_len)
    report = asyncio.run(run(cfg, rows))
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))
    t, i = report["ttft_ms"], report["itl_ms"]
    typer.echo(
        f"requests {report['ok']}/{report['requests']} ok, errors {report['errors']}, "
        f"{report['requests_per_s']:.2f} req/s, {report['generated_tokens_per_s']:.1f} generated tok/s\n"
        f"TTFT ms p50 {t['p50']:.1f} p90 {t['p90']:.1f} p99 {t['p99']:.1f}; "
        f"ITL ms p50 {i['p50']:.2f} p90 {i['p90']:.2f} p99 {i['p99']:.2f}"
    )
    for e in report["error_examples"]:
        typer.echo(f"error: {e}", err=True)
    if report["ok"] == 0:
        raise typer.Exit(1)


SYNTHETIC_DISTINCT = 4096  # distinct synthetic prompts; a longer run sends them again, in turn


def synthetic_prompts(length: int, count: int, shared_prefix: int = 0, seed: int = 0) -> list[dict]:
    """Token-id prompts of exact length (random ids in 10..265, valid for any vocabulary from 266 up; no
    tokenizer needed): the first `shared_prefix` tokens the same in all, the rest drawn per prompt. Distinct
    per request, so the server's prefix cache serves only what the load shares on purpose (a load that
    cycled 64 prompts would have read most of its prompts from the cache)."""
    rng = random.Random(seed)
    prefix = [10 + rng.randrange(256) for _ in range(shared_prefix)]
    return [{"prompt": prefix + [10 + rng.randrange(256) for _ in range(length - shared_prefix)]}
            for _ in range(count)]  # fmt: skip


def register(app: typer.Typer) -> None:
    app.command("serve-llm")(serve_llm)
    app.command("loadtest-llm")(loadtest_llm)


def main() -> None:
    """`python -m inferforge.serve.openai.cli`: these two commands alone, errors as in the main CLI."""
    import sys

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True)
    register(app)
    try:
        app()
    except InferforgeError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
