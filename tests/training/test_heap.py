"""settle_heap: surviving objects leave the collector's view; a later call collects what died since."""

from __future__ import annotations

import gc
import weakref

from tensafe.training._heap import settle_heap


class _Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the cyclic collector frees it


def test_settle_freezes_survivors_and_a_second_call_collects_frozen_garbage() -> None:
    try:
        node = _Node()
        alive = weakref.ref(node)
        settle_heap()
        assert gc.get_freeze_count() > 0
        del node
        gc.collect()  # frozen objects are not traversed: the dead cycle survives a collection
        assert alive() is not None
        settle_heap()  # unfreezes, collects, refreezes
        assert alive() is None
    finally:
        gc.unfreeze()
