"""The trainer's garbage-collector settings (loop_util.GCFreeze): what is alive after an optimizer
step is frozen out of full collections, cyclic garbage among it is collected at reclaim (each
checkpoint), and everything is restored at the end."""

from __future__ import annotations

import gc
import weakref

from blocklm.tools.train.loop_util import FULL_GC_EVERY, GCFreeze


class Node:
    def __init__(self) -> None:
        self.me = self  # a reference cycle: only the collector frees it


def test_step_freezes_survivors_and_reclaim_frees_their_cyclic_garbage():
    before = gc.get_threshold()
    with GCFreeze() as g:
        assert g.active and gc.get_threshold()[2] == max(before[2], FULL_GC_EVERY)
        n = Node()
        ref = weakref.ref(n)
        frozen = gc.get_freeze_count()
        g.step()  # n survives the step: frozen
        assert gc.get_freeze_count() > frozen
        del n
        gc.collect()  # a full collection does not see frozen objects
        assert ref() is not None
        g.reclaim()
        assert ref() is None
        assert gc.get_freeze_count() > 0  # frozen again
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before


def test_a_callers_own_freeze_is_left_alone():
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        with GCFreeze() as g:
            assert not g.active
            g.step()
            g.reclaim()
            assert gc.get_freeze_count() == n
        assert gc.get_freeze_count() == n
    finally:
        gc.unfreeze()
