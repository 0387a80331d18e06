"""serve-llm's option helpers: the automatic HTTP worker count and the prompt-graph token buckets."""

from __future__ import annotations

import pytest

from inferforge.errors import InferforgeError
from inferforge.serve.openai.cli import auto_api_server_count, parse_token_buckets


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
