"""serve-llm's and loadtest-llm's option helpers: the automatic HTTP worker count, the prompt-graph token
buckets, the synthetic prompts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from inferforge.errors import InferforgeError
from inferforge.serve.openai.cli import auto_api_server_count, parse_token_buckets, synthetic_prompts

from .server_proc import CLI_MODULE


@pytest.mark.parametrize(
    ("device", "mode", "cores", "want"),
    [
        ("cuda", "process", 16, 4),
        ("cuda:1", "process", 128, 4),
        ("cuda", "process", 8, 2),
        ("cuda", "process", 2, 1),
        ("cuda", "thread", 16, 1),
        ("cpu", "process", 64, 1),
    ],
)
def test_auto_worker_count(device: str, mode: str, cores: int, want: int) -> None:
    assert auto_api_server_count(device, mode, cores) == want


def test_token_buckets_parse_sorted_and_none_disables() -> None:
    assert parse_token_buckets("512, 128,256,128", "--f") == (128, 256, 512)
    assert parse_token_buckets("none", "--f") == () == parse_token_buckets(" ", "--f")
    with pytest.raises(InferforgeError, match="--f"):
        parse_token_buckets("128,x", "--f")
    with pytest.raises(InferforgeError, match="positive"):
        parse_token_buckets("-5,128", "--f")


def test_synthetic_prompts_are_distinct_except_the_shared_prefix() -> None:
    rows = [r["prompt"] for r in synthetic_prompts(40, 200)]
    assert all(len(p) == 40 and all(10 <= t < 266 for t in p) for p in rows)
    assert len({tuple(p[:16]) for p in rows}) == 200  # no two share a first cache block
    shared = [r["prompt"] for r in synthetic_prompts(40, 50, shared_prefix=32)]
    assert len({tuple(p[:32]) for p in shared}) == 1 and len({tuple(p[32:]) for p in shared}) == 50
    assert synthetic_prompts(40, 3) == synthetic_prompts(40, 3)  # seeded: the same load every run


def test_loadtest_refuses_a_shared_prefix_longer_than_the_prompt() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", CLI_MODULE, "loadtest-llm", "http://127.0.0.1:9", "--prompt-len", "8",
         "--shared-prefix-len", "9"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "--shared-prefix-len 9 exceeds --prompt-len 8" in proc.stderr


def test_a_bad_tool_call_parser_is_refused_naming_the_flag() -> None:
    from inferforge.errors import InferforgeError
    from inferforge.serve.openai.cli import _limits

    assert _limits(tool_call_parser="mistral").tool_call_parser == "mistral"
    with pytest.raises(InferforgeError, match="--tool-call-parser"):
        _limits(tool_call_parser="pythonic")
