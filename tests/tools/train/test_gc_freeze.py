"""The trainer's garbage-collector settings (loop_util.GCFreeze): the objects alive when training
starts are frozen out of full collections, full collections are rarer, and everything is
restored at the end (also when a caller froze objects itself)."""

from __future__ import annotations

import gc
import weakref

import torch

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


def test_objects_frozen_before_do_not_stop_the_freeze_and_stay_frozen():
    """The H200's imports leave objects frozen (375): the trainer must freeze all the same (it
    froze nothing there before, and each full collection traversed the model and every
    module), and at the end leave what was frozen before frozen."""
    gc.freeze()
    try:
        n = gc.get_freeze_count()
        made = Node()
        ref = weakref.ref(made)
        with GCFreeze() as g:
            assert not g.active and gc.get_freeze_count() > n  # frozen, not ours to undo
            del made
            gc.collect()
            assert ref() is not None  # frozen with the rest
        assert gc.get_freeze_count() > n  # what was frozen before (and the trainer's) stays
    finally:
        gc.unfreeze()
        gc.collect()


def test_the_trainer_loads_its_indexes_before_it_freezes():
    """The text set's indexes were built after the start-of-fit freeze (by its first pass), and
    every full collection traversed them: the trainer loads them first, so they are frozen."""
    from blocklm.tools.train.loop import Trainer

    class Fake:  # what Trainer.fit uses of a trainer
        def __init__(self) -> None:
            self.source, self.seen = self, []
            self.t = type("T", (), {"host_threads": None})()  # train.host_threads: unchanged
            self.device = torch.device("cpu")

        def load_indexes(self) -> int:
            self.seen.append(("load", gc.get_freeze_count()))
            return 1

        def _fit(self, steps, minutes):
            self.seen.append(("fit", gc.get_freeze_count()))
            return {}

    f = Fake()
    assert Trainer.fit(f, steps=1, minutes=None) == {}
    assert [w for w, _ in f.seen] == ["load", "fit"] and f.seen[1][1] > f.seen[0][1]
