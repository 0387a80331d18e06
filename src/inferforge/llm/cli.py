"""`inferforge generate`: one prompt through the engine, streamed to the terminal."""

from __future__ import annotations

from pathlib import Path

import typer


def generate(
    model_dir: Path = typer.Argument(
        ..., help="Hugging Face model folder (config.json, *.safetensors, tokenizer)."
    ),
    prompt: str = typer.Option(..., help="Prompt text."),
    max_new_tokens: int = typer.Option(128, min=1, help="Tokens to generate at most."),
    quant: str = typer.Option(
        "none",
        help="Weight-only quantization (CUDA, gemlite): none, int8, fp8 (compute capability 8.9+) or int4.",
    ),
    device: str = typer.Option("auto", help="cpu, cuda, or auto (cuda when available)."),
    temperature: float = typer.Option(0.0, min=0.0, max=2.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, min=0, help="Sample from the k most likely tokens; 0 is off."),
    seed: int | None = typer.Option(None, help="Seed for reproducible sampling."),
    chat: bool = typer.Option(False, help="Wrap the prompt in the model's chat template."),
    speculative_tokens: int = typer.Option(
        0,
        min=0,
        max=16,
        help="Greedy only: draft up to this many tokens a step by looking up the context's last n-gram "
        "earlier in it (prompt lookup), verified in one pass; the tokens are greedy decoding's. 0 is off.",
    ),
) -> None:
    """Generate text from a local model with the inferforge LLM engine."""
    import time

    import torch

    from inferforge.errors import InferforgeError
    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if quant not in ("none", "int8", "fp8", "int4"):
        raise InferforgeError(f"--quant {quant!r}: choose none, int8, fp8 or int4")
    engine = LLMEngine(
        model_dir,
        EngineConfig(
            device=device,
            quant=None if quant == "none" else quant,  # type: ignore[arg-type]
            max_num_seqs=1,
            kv_cache_tokens=8192 if device == "cpu" else None,
            speculative_tokens=speculative_tokens,
        ),
    )
    tok = engine.tokenizer
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}]) if chat else tok.encode(prompt)
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )
    engine.add_request(EngineRequest("cli", tuple(ids), params))
    start, first, n = time.perf_counter(), None, 0
    while engine.has_unfinished():
        for out in engine.step():
            first = first or time.perf_counter()
            n = out.completion_tokens
            typer.echo(out.new_text, nl=False)
    end = time.perf_counter()
    rate = (n - 1) / (end - first) if first and n > 1 and end > first else 0.0
    typer.echo("")
    typer.secho(
        f"[{n} tokens, first after {((first or end) - start) * 1e3:.0f} ms, {rate:.1f} tokens/s]", err=True
    )


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
