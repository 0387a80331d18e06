from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from inferforge.llm import cli as llm_cli


def _app() -> typer.Typer:
    app = typer.Typer()
    llm_cli.register(app)
    app.command("noop")(lambda: None)  # keep typer in multi-command mode
    return app


@pytest.mark.parametrize("spec", ["0", "4"])
def test_generate_prints_the_greedy_continuation(tiny_llama: Path, spec: str) -> None:
    from inferforge.llm.engine import EngineConfig, LLMEngine
    from inferforge.llm.protocol import EngineRequest, SamplingParams

    args = ["--max-new-tokens", "12", "--device", "cpu", "--speculative-tokens", spec]
    result = CliRunner().invoke(_app(), ["generate", str(tiny_llama), "--prompt", "Return a", *args])
    assert result.exit_code == 0, result.output
    engine = LLMEngine(tiny_llama, EngineConfig(kv_cache_tokens=512))
    req = EngineRequest(
        "x", tuple(engine.tokenizer.encode("Return a")), SamplingParams(max_tokens=12, temperature=0)
    )
    expected = "".join(o.new_text for o in engine.generate([req])["x"][0])
    assert expected.strip() and expected in result.stdout


def test_bad_quant_is_a_clear_error(tiny_llama: Path) -> None:
    result = CliRunner().invoke(_app(), ["generate", str(tiny_llama), "--prompt", "x", "--quant", "int3"])
    assert result.exit_code != 0
    assert "int3" in str(result.exception)
