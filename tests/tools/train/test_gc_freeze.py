"""The trainer's garbage-collector settings (loop_util.GCFreeze): the objects alive when training
starts are frozen out of full collections, full collections are rarer, and everything is
restored at the end (also when a caller froze objects itself)."""

from __future__ import annotations

import gc
import weakref

from blocklm.tools.train.loop_util import FULL_GC_EVERY, GCFreeze


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_objects_alive_at_the_start_are_frozen_and_all_is_restored():
    before = gc.get_threshold()
    n = Node()
    ref = weakref.ref(n)
    with GCFreeze() as g:
        assert g.active and gc.get_freeze_count() > 0
        assert gc.get_threshold()[2] == max(before[2], FULL_GC_EVERY)
        del n
        gc.collect()  # a full collection does not see the frozen cycle
        assert ref() is not None
        young = Node()
        young_ref = weakref.ref(young)
        del young
        gc.collect()  # one made while training is collected as usual
        assert young_ref() is None
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before
    gc.collect()
    assert ref() is None


def test_a_callers_own_freeze_is_left_alone():
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        with GCFreeze() as g:
            assert not g.active and gc.get_freeze_count() == n
        assert gc.get_freeze_count() == n
    finally:
        gc.unfreeze()
