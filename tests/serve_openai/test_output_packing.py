"""The engine process's output rows: whole for a sequence's first and last delta and for deltas with text or
logprobs, compact (4 fields) in between; a link rebuilds the same `EngineOutput`s."""

from __future__ import annotations

import asyncio

from inferforge.llm.protocol import EngineOutput, RequestTiming, TokenLogprob
from inferforge.serve.openai.engine_link import EngineLink, EngineProcessError, _Stream, pack


def _out(tokens: tuple[int, ...], done: int, **kw) -> EngineOutput:
    base = dict(request_id="r", index=0, new_token_ids=tokens, new_text="", logprobs=None, finished=False,
                finish_reason=None, prompt_tokens=7, completion_tokens=done,
                timing=RequestTiming(1.0, 2.0, 3.0, None))  # fmt: skip
    base.update(kw)
    return EngineOutput(**base)  # type: ignore[arg-type]


def _link_with_stream() -> EngineLink:
    link = EngineLink.__new__(EngineLink)  # no engine: only the unpacking is under test
    link._streams = {"r": _Stream(asyncio.new_event_loop(), asyncio.Queue())}
    return link


def test_middle_deltas_go_compact_and_come_back_equal() -> None:
    outs = [
        _out((5,), 1),  # first: whole
        _out((6,), 2),  # compact
        _out((7, 8), 4),  # compact (several tokens)
        _out((9,), 5, new_text="x"),  # text: whole
        _out((10,), 6, logprobs=(TokenLogprob(10, -0.5),)),  # logprobs: whole
        _out((11,), 7, index=1),  # another sequence's middle delta: compact
        _out((12,), 8, finished=True, finish_reason="length", timing=RequestTiming(1.0, 2.0, 3.0, 9.0)),
        _out((13,), 1, index=2, prompt_logprobs=(TokenLogprob(3, -1.5, ((3, -1.5), (4, -2.0))),)),  # whole
    ]
    rows = pack(outs)
    assert [len(r) for r in rows] == [14, 4, 4, 14, 14, 4, 14, 14]
    back = [o for _, o in _link_with_stream()._unpack(rows)]
    assert back == outs


def test_rows_of_a_gone_request_are_dropped_and_an_orphan_compact_row_fails_its_request() -> None:
    link = _link_with_stream()
    assert link._unpack(pack([_out((5,), 1, request_id="gone")])) == []
    ((rid, item),) = link._unpack([("r", 0, (6,), 2)])
    assert rid == "r" and isinstance(item, EngineProcessError)
