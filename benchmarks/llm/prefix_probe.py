"""Where the time to first token of a cached-prefix prompt goes (H14: 9-11 ms on, 6.5-6.8 off).

    cd benchmarks/llm && python prefix_probe.py

One engine per setting (prefix caching off, on), warmed with the same prompt shapes, then one request of a
1,024-token shared prefix + 32 tokens profiled (torch.profiler, CPU and CUDA): the top operators by device
time and by host time. Prints tables; writes prefix_probe.json under $OUT.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from bench_prefix import first_token_s, prompts
from common import free, make_random_1b, write_json

from inferforge.llm.engine import EngineConfig, LLMEngine


def main() -> None:
    folder = make_random_1b(Path(tempfile.mkdtemp()))
    out: dict = {}
    prefix = tuple(range(100, 1124))
    for caching in (False, True):
        cfg = EngineConfig(device="cuda", max_num_seqs=64, max_model_len=4096, enable_prefix_caching=caching)
        eng = LLMEngine(folder, cfg)
        for i, p in enumerate(prompts(4, prefix, 32, 1)):
            first_token_s(eng, p, f"w{i}")
        (probe,) = prompts(1, prefix, 32, 2)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            ms = first_token_s(eng, probe, "probe") * 1e3
        avg = prof.key_averages()
        by_dev = sorted(avg, key=lambda e: -e.device_time_total)[:12]
        by_cpu = sorted(avg, key=lambda e: -e.self_cpu_time_total)[:12]
        print(f"== prefix caching {caching}: TTFT {ms:.1f} ms under the profiler", flush=True)
        for e in by_dev:
            print(f"  dev {e.device_time_total / 1e3:7.2f} ms  n={e.count:4d}  {e.key[:80]}")
        for e in by_cpu:
            print(f"  cpu {e.self_cpu_time_total / 1e3:7.2f} ms  n={e.count:4d}  {e.key[:80]}")
        out[str(caching)] = {
            "ttft_ms": ms,
            "device": [(e.key, e.device_time_total, e.count) for e in by_dev],
            "host": [(e.key, e.self_cpu_time_total, e.count) for e in by_cpu],
        }
        del eng
        free()
    write_json("prefix_probe.json", out)


if __name__ == "__main__":
    main()
