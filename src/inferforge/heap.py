"""The cyclic garbage collector and long-lived processes: the servers, and the LLM engine once loaded
(`EngineConfig.freeze_gc_heap`)."""

from __future__ import annotations

import gc


def refreeze() -> None:
    """Keep what is alive now (frameworks, models) out of the cyclic collector's scans, which otherwise walk
    the whole heap on the request path (about a tenth of the event loop's CPU per request at low load under
    `perf`, benchmarks/serve/overhead_cpu.py). Called again after a load or unload: frozen objects are never
    collected, so an unloaded model's reference cycles (and the device memory they hold) must be unfrozen
    and collected first."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
