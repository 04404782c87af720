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
            # train.host_threads: unchanged; full collections every 123 generation-1 ones
            self.t = type("T", (), {"host_threads": None, "full_gc_every": 123})()
            self.device = torch.device("cpu")

        def load_indexes(self) -> int:
            self.seen.append(("load", gc.get_freeze_count()))
            return 1

        def _fit(self, steps, minutes):
            self.seen.append(("fit", gc.get_freeze_count()))
            assert gc.get_threshold()[2] == max(123, threshold[2])  # train.full_gc_every
            return {}

    threshold = gc.get_threshold()
    f = Fake()
    assert Trainer.fit(f, steps=1, minutes=None) == {}
    assert gc.get_threshold() == threshold
    assert [w for w, _ in f.seen] == ["load", "fit"] and f.seen[1][1] > f.seen[0][1]


def test_full_collections_every_n_is_a_checked_setting():
    """``train.full_gc_every`` (default FULL_GC_EVERY = 500: on the H200 a full collection
    traversed 184-280k live objects in 119-291 ms every 14-40 steps at 50, GPU_NOTES P41-P43)
    sets the third threshold while fitting; what is not a whole number >= 1 is refused."""
    import pytest

    from blocklm.tools.train.config import build_config

    assert build_config("tiny").train.full_gc_every == FULL_GC_EVERY == 500
    assert build_config("tiny", ["train.full_gc_every=50"]).train.full_gc_every == 50
    for bad in ("0", "-3", "2.5", "none", "true"):
        with pytest.raises(ValueError, match="full_gc_every"):
            build_config("tiny", [f"train.full_gc_every={bad}"])
    before = gc.get_threshold()
    with GCFreeze(full_every=777):
        assert gc.get_threshold()[2] == max(before[2], 777)
    assert gc.get_threshold() == before
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match="full_gc_every"):
            GCFreeze(full_every=bad)
