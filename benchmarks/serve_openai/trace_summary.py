"""Where a server run's time went, from `bench_server.py --trace-engine`'s engine trace and its JSON.

    python benchmarks/serve_openai/trace_summary.py bench_server.json engine_trace_process_5.0.jsonl.gz [key]

`key` names the server run in the JSON (e.g. server_process_5.0_4w_clients-split); the first one by default.

Per wave: when requests reached the engine (ms after the common start) and what each prompt step cost; per
closed loop: prompt and decode steps and the share of the wall clock the engine spent stepping.
"""

from __future__ import annotations

import gzip
import json
import statistics
import sys
from pathlib import Path


def load_trace(path: Path) -> list[list[float]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        return [json.loads(line) for line in f if line.strip()]


def window(rows: list[list[float]], run: dict) -> list[list[float]]:
    return [r for r in rows if run["start_at"] <= r[0] <= run["start_at"] + run["wall_s"]]


def main() -> None:
    res = json.loads(Path(sys.argv[1]).read_text())
    rows = load_trace(Path(sys.argv[2]))
    key = sys.argv[3] if len(sys.argv) > 3 else next(k for k in res if k.startswith("server_process_"))
    server = res[key]
    # row: start (Unix s), requests added, step s, outputs, first tokens, running, waiting
    for w in server.get("waves", []):
        steps = window(rows, w)
        prompt = [r for r in steps if r[1] or r[4]]
        end = 1e3 * (steps[-1][0] + steps[-1][2] - w["start_at"])
        desc = " | ".join(f"t{1e3 * (r[0] - w['start_at']):.0f} +{r[1]} {r[2] * 1e3:.1f} ms" for r in prompt)
        print(f"wave {w['tokens_per_s']:,.0f} tok/s, wall {w['wall_s'] * 1e3:.0f} ms, client TTFT p50 "
              f"{w['ttft_p50_ms']:.0f} ms, last step ends {end:.0f} ms; prompt steps: {desc}")  # fmt: skip
    for run in server["throughput"]:
        steps = window(rows, run)
        prompt = [r for r in steps if r[1] or r[4]]
        decode = [r for r in steps if not (r[1] or r[4])]
        busy = sum(r[2] for r in steps)
        p_s, d_s = sum(r[2] for r in prompt), sum(r[2] for r in decode)
        p_med, d_med = (statistics.median(r[2] for r in x) * 1e3 for x in (prompt, decode))
        arrivals = sum(r[1] for r in prompt) / len(prompt)
        print(
            f"closed loop {run['tokens_per_s']:,.0f} tok/s, wall {run['wall_s']:.2f} s: engine stepping "
            f"{busy:.2f} s ({busy / run['wall_s']:.0%}); {len(prompt)} steps with prompts or first tokens "
            f"{p_s:.2f} s (median {p_med:.1f} ms, {arrivals:.1f} arrivals each); {len(decode)} decode steps "
            f"{d_s:.2f} s (median {d_med:.2f} ms)"
        )


if __name__ == "__main__":
    main()
