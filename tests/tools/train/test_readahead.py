"""Epoch read-ahead: same samples in the same order, the next epoch read before it is asked for."""

from __future__ import annotations

import threading

import pytest

from blocklm.tools.train.readahead import EpochReadAhead


class Source:
    """A loader stand-in: the epoch selects the order; records which threads read it."""

    def __init__(self, n: int, fail_at: int | None = None) -> None:
        self.n, self.epoch, self.fail_at = n, 0, fail_at
        self.readers: list[tuple[int, str]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        e = self.epoch
        for i in range(self.n):
            if e == 1 and self.fail_at == i:
                raise OSError(f"shard-000001.tar: sample {i}: truncated record")
            self.readers.append((e, threading.current_thread().name))
            yield (e, (i * 7 + e) % self.n)


def test_epochs_are_the_sources_own_order():
    plain, src = Source(10), Source(10)
    ra = EpochReadAhead(src, depth=4)
    for epoch in range(3):
        plain.set_epoch(epoch)
        assert list(ra.epoch(epoch)) == list(plain)
    ra.close()


def test_next_epoch_is_read_in_a_thread_once_the_epoch_is_drawn():
    src = Source(10)
    ra = EpochReadAhead(src, depth=4)
    assert len(list(ra.epoch(0))) == 10
    ra._next.thread.join()  # started when epoch 0's last sample was drawn
    ahead = [t for e, t in src.readers if e == 1]
    assert ahead == ["epoch-read-ahead-1"] * 4  # depth samples, before epoch 1 is asked for
    assert list(ra.epoch(1))[:5] == [(1, (i * 7 + 1) % 10) for i in range(5)]
    ra.close()


def test_a_skipped_epoch_and_short_epochs():
    src = Source(3)
    ra = EpochReadAhead(src, depth=8)  # deeper than the epoch: it ends within the read-ahead
    assert len(list(ra.epoch(0))) == 3
    assert list(ra.epoch(1)) == [(1, 1), (1, 2), (1, 0)]
    assert list(ra.epoch(5)) == [(5, 2), (5, 0), (5, 1)]  # not the epoch read ahead (2)
    ra.close()


def test_loader_errors_reach_the_consumer():
    src = Source(6, fail_at=2)  # epoch 1's read-ahead fails at its third sample
    ra = EpochReadAhead(src, depth=4)
    assert len(list(ra.epoch(0))) == 6
    with pytest.raises(OSError, match="shard-000001.tar"):
        list(ra.epoch(1))


def test_next_epoch_is_prepared_ahead_and_taken_once():
    """The read-ahead also prepares (decodes) the next epoch's first samples in its thread; the
    dispatcher's prepare then takes those results instead of decoding again in its own time."""
    calls: list[tuple[tuple[int, int], str]] = []

    def prepare(sample):
        calls.append((sample, threading.current_thread().name))
        return ("pieces", sample)

    src = Source(6)
    ra = EpochReadAhead(src, depth=4, prepare=prepare)
    get = ra.cached(prepare)
    assert [get(s) for s in ra.epoch(0)] == [("pieces", s) for s in ((0, i * 7 % 6)
                                                                    for i in range(6))]
    ra._next.thread.join()
    ahead = [c for c in calls if c[0][0] == 1]
    assert [t for _, t in ahead] == ["epoch-read-ahead-1"] * 4
    out = [get(s) for s in ra.epoch(1)]
    assert out == [("pieces", (1, (i * 7 + 1) % 6)) for i in range(6)]
    again = [c for c in calls if c[0][0] == 1]
    assert len(again) == 6  # 4 prepared ahead, only the last 2 prepared on demand
    ra.close()


def test_an_epoch_read_whole_is_planned_in_the_thread_and_taken_whole():
    """The trainer's turnover admitted the whole next epoch in its own thread; the read-ahead
    now also builds the admission plan of an epoch it read whole, and hands it over."""
    plans = []

    def plan(samples, pieces):
        plans.append((threading.current_thread().name, list(samples), list(pieces)))
        return ("plan", len(samples))

    src = Source(5)
    ra = EpochReadAhead(src, depth=8, prepare=lambda s: ("p", s), auto=False, plan=plan)
    assert ra.take_whole(0) is None  # nothing was read ahead of it
    assert len(list(ra.epoch(0))) == 5 and ra.start_next()
    assert ra.take_whole(1) == ("plan", 5)
    want = [(1, (i * 7 + 1) % 5) for i in range(5)]
    assert plans == [("epoch-read-ahead-1", want, [("p", s) for s in want])]
    assert ra.start_next()  # taking the plan drew the epoch: the next one is read ahead
    assert ra.take_whole(2) == ("plan", 5) and ra.take_whole(2) is None  # taken once
    ra.close()


def test_epochs_that_are_not_planned_are_served_as_before():
    """An epoch longer than the read-ahead, a plan declined (bad data: the dispatcher admits
    and reports it one by one) or failing (a bug: re-raised)."""
    ra = EpochReadAhead(Source(10), depth=4, plan=lambda s, p: "plan")
    assert len(list(ra.epoch(0))) == 10
    assert ra.take_whole(1) is None
    assert list(ra.epoch(1)) == [(1, (i * 7 + 1) % 10) for i in range(10)]
    ra.close()
    ra = EpochReadAhead(Source(4), depth=8, plan=lambda s, p: None)
    list(ra.epoch(0))
    assert ra.take_whole(1) is None and ra.whole(1)
    assert list(ra.epoch(1)) == [(1, (i * 7 + 1) % 4) for i in range(4)]
    ra.close()

    def broken(samples, pieces):
        raise KeyError("plan")
    ra = EpochReadAhead(Source(4), depth=8, plan=broken)
    list(ra.epoch(0))
    assert ra.take_whole(1) is None
    with pytest.raises(KeyError, match="plan"):
        list(ra.epoch(1))


class Rec:
    """A sample stand-in that is not interned or cached: a freed one's id is soon reused."""

    __slots__ = ("key",)

    def __init__(self, key) -> None:
        self.key = key


class Recs(Source):
    def __iter__(self):
        for i in range(self.n):
            yield Rec((self.epoch, i))


def test_a_sample_drawn_but_not_prepared_does_not_lend_its_pieces_to_another():
    """A resumed run skips the drawn samples that were not in flight without preparing them:
    their read-ahead entries stayed, and a later sample given a freed one's id (CPython reuses
    memory) took its pieces (seen as a resumed run's loss differing, now and then)."""
    ra = EpochReadAhead(Recs(400), depth=200, prepare=lambda s: s.key, auto=False)
    get = ra.cached(lambda s: s.key)
    assert [get(s) for s in ra.epoch(0)] == [(0, i) for i in range(400)]
    ra.start_next()
    got = []
    for i, s in enumerate(ra.epoch(1)):
        if i % 2 == 0 and i < 200:  # drawn, never prepared (before: freed, their ids reused)
            continue
        got.append((s.key, get(s)))
    assert len(got) == 300 and all(k == p for k, p in got)
    ra.close()
