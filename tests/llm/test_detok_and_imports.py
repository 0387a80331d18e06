from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inferforge.llm.detok import IncrementalDetokenizer, Tokenizer


def test_stop_string_prefix_is_held_back_until_ruled_out(tiny_llama: Path) -> None:
    tok = Tokenizer(tiny_llama)
    ids = tok.encode("alpha beta gamma")
    detok = IncrementalDetokenizer(tok, stop=("beta gx",))
    emitted = ""
    for t in ids:
        assert not detok.add(t)
        emitted += detok.pop(final=False)
        assert not detok.text.endswith("beta") or not emitted.endswith("beta")
    emitted += detok.pop(final=True)
    assert emitted == "alpha beta gamma"


def test_engine_core_imports_no_web_framework() -> None:
    code = (
        "import sys, inferforge.llm.async_engine, inferforge.llm.engine; "
        "bad = [m for m in ('fastapi', 'starlette', 'uvicorn', 'httpx') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_byte_level_fast_path_streams_exactly_what_decode_returns(tiny_llama: Path) -> None:
    import random

    tok = Tokenizer(tiny_llama)
    assert tok.byte_table is not None
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tok.byte_table)) for _ in range(30)]
        detok = IncrementalDetokenizer(tok)
        streamed = ""
        for t in ids:
            detok.add(t)
            piece = detok.pop(final=False)
            streamed += piece
        streamed += detok.pop(final=True)
        assert streamed == tok.decode(ids)


def test_special_tokens_are_skipped_unless_the_request_keeps_them(tiny_llama: Path) -> None:
    """`skip_special_tokens=False` (vLLM's parameter) keeps a special token's text, streamed as `decode`
    gives it, on the byte-level table and on the tokenizer's own path alike."""
    tok = Tokenizer(tiny_llama)
    special = sorted(tok.special_bytes)[0]
    name = tok.special_bytes[special].decode()
    ids = [*tok.encode("alpha "), special, *tok.encode(" beta")]
    for table in (tok.byte_table, None):
        tok.byte_table = table
        for skip in (True, False):
            detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
            streamed = ""
            for t in ids:
                detok.add(t)
                streamed += detok.pop(final=False)
            streamed += detok.pop(final=True)
            assert streamed == tok.decode(ids, skip_special_tokens=skip)
            assert (name in streamed) is not skip
