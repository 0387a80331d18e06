"""The server freezes the heap once models are loaded; an unloaded model's cycles must still be collected."""

from __future__ import annotations

import gc
import weakref

from inferforge.serve.http.app import refreeze


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle, like a graph module's nodes and graph


def test_refreeze_collects_cycles_that_died_while_frozen() -> None:
    node = _Node()
    ref = weakref.ref(node)
    gc.freeze()
    try:
        del node
        gc.collect()
        assert ref() is not None, "a frozen cycle should survive a plain collection"
        refreeze()
        assert ref() is None, "refreeze left the dead cycle frozen"
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
