"""Host time the engine process spends sending one decode step's outputs (`_Hub.send_outs`), to 1 and 4 links.

Why: the engine process is the one part of `serve-llm` that does not scale out; every microsecond it spends
on IPC is a microsecond it does not step the engine. This times the real `send_outs` over real pipes to
reader processes, for 64 outputs a step (middle deltas of their sequences, text made by the HTTP workers),
in turn: with the engine's stats attached to every message and every output as a whole 13-field row (as until
2026-11-23 morning); stats only with a finished output or every 0.25 s, whole rows (until the afternoon);
and as it runs now (middle deltas as 4-field rows, `engine_link.pack`).

    python benchmarks/serve_openai/hub_cost.py
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import time
from typing import Any

from inferforge.llm.protocol import EngineOutput, EngineStats, RequestTiming
from inferforge.serve.openai import engine_process
from inferforge.serve.openai.engine_link import pack, pack_full
from inferforge.serve.openai.engine_process import _Hub, _LoopClock


class _Stats:
    """Stands in for `LLMEngine` where `send_outs` only asks for its stats."""

    def stats(self) -> EngineStats:
        return EngineStats(64, 0, 10_000, 1_000, 123_456, 1.5)

    def has_unfinished(self) -> bool:
        return True


def _drain(conn: Any) -> None:
    while True:
        try:
            conn.recv_bytes()
        except EOFError:
            return


def _time(fn: Any, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def main(n: int = 20_000, rounds: int = 3) -> None:
    ctx = mp.get_context("spawn")
    pairs = [ctx.Pipe() for _ in range(4)]
    readers = [ctx.Process(target=_drain, args=(b,), daemon=True) for _, b in pairs]
    for r in readers:
        r.start()
    outs = [
        EngineOutput(f"cmpl-{i:032x}-0", 0, (1234,), "", None, False, None, 128, 57,
                     RequestTiming(1.0, 2.0, 3.0, None))
        for i in range(64)
    ]  # fmt: skip
    for links in (1, 4):
        conns = [a for a, _ in pairs[:links]]
        hub = _Hub(conns[0], _Stats(), _LoopClock())
        hub.conns = list(conns)
        for i, o in enumerate(outs):
            hub.owner[o.request_id] = [conns[i % links], 1]

        def whole_rows(rows: list) -> list:
            return [pack_full(o) for o in rows]

        def every_step(hub: _Hub = hub) -> None:
            hub.stats_sent.clear()  # stats attached to every message
            hub.send_outs(outs)

        def rare_stats(hub: _Hub = hub) -> None:
            hub.send_outs(outs)

        runs: dict[str, list[float]] = {"stats every step": [], "whole rows": [], "as now": []}
        for _ in range(rounds):  # in turn, so drift hits all
            engine_process.pack = whole_rows  # type: ignore[assignment]
            runs["stats every step"].append(_time(every_step, n))
            runs["whole rows"].append(_time(rare_stats, n))
            engine_process.pack = pack
            runs["as now"].append(_time(rare_stats, n))
        for label, times in runs.items():
            us = [t * 1e6 for t in times]
            print(f"{links} link(s), 64 outputs, {label:16s}: median {statistics.median(us):6.1f} us "
                  f"(rounds {', '.join(f'{u:.1f}' for u in us)})")  # fmt: skip
    for a, _ in pairs:
        a.close()


if __name__ == "__main__":
    main()
