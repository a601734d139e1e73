"""The consumer's cyclic-GC setting (pipeline/app.py): survivors of a collection are frozen,
so the next collection scans only what was allocated since."""

from __future__ import annotations

import gc

from runstate.pipeline.app import freeze_survivors


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def test_survivors_are_frozen_and_young_cycles_are_still_collected() -> None:
    gc.callbacks.append(freeze_survivors)
    try:
        gc.collect()
        frozen_before = gc.get_freeze_count()
        kept = [Node() for _ in range(1000)]  # survive the next collection
        a, b = Node(), Node()
        a.other, b.other = b, a  # a cycle that is garbage before the collection
        del a, b
        collected = gc.collect(0)
        assert collected >= 2  # the young cycle is found
        assert gc.get_freeze_count() >= frozen_before + len(kept)  # the survivors are frozen
        assert gc.get_count()[0] < 100 and len(gc.get_objects(0)) < 100  # the young generation starts empty
    finally:
        gc.callbacks.remove(freeze_survivors)
        gc.unfreeze()
