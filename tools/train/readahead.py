"""Epoch read-ahead: the next epoch's first samples are read while the current one drains.

It serves per-epoch dispatcher runs (``train.chain_epochs=false``). Chained epochs (the default,
:mod:`.chain`) have no turnover: the dispatcher's prefetch thread reads on across the epoch
boundary, released at optimizer steps (:meth:`.chain.EpochChain.gate`), and the examples are
admitted one by one as in-flight places free up (bench_turnover, CPU proxy: 8-11 ms of the
trainer's thread per text step, against ~0.3 ms for a planned whole epoch; see :mod:`.chain`).

At an epoch turnover the dispatcher admits ``max_in_flight`` examples of the new epoch before it
forms a batch, and the loader (shard order, shuffle buffer, reading) starts from nothing: on the
small text set (about four optimizer steps per epoch) that stall was most of the trainer's data
wait (132-259 ms at turnovers against ~10 ms in other steps, `bench train`'s ``data_wait_ms``).
Once an epoch's last sample has been drawn, while the dispatcher still runs the epoch's tail
batches, a thread selects the next epoch, reads its first ``depth`` samples and prepares them
(the dispatcher's decode and split, :meth:`EpochReadAhead.cached`); that epoch starts from them. The samples and their order are exactly those of an unwrapped source (one
reader, the same ``set_epoch``), so batches, checkpoints and resumption do not change.

With ``auto=False`` the thread waits for :meth:`EpochReadAhead.start_next` (the trainer calls it
at its optimizer steps). On the small text set an epoch fits in flight (7,222 samples, 8,192
admitted), so its last sample is drawn while the dispatcher admits the epoch: a read-ahead
started then read and decoded the next epoch (~0.2-0.4 s of Python on the CPU, with a full
garbage collection in it) while the main thread admitted 7,222 examples, the turnover's data wait.
Started at an optimizer step instead, most of it overlaps the backward pass, which runs without
the GIL.

An epoch read whole is also planned for admission in the thread (``plan``: the dispatcher's
:func:`~blocklm.pipeline.dispatch_admit.plan_admission`, its examples and first requests built
ahead): :meth:`EpochReadAhead.take_whole` hands it over, and the turnover's admission in the
trainer's thread is a few operations per example instead of ~6 us each (bench_turnover).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any


class _Ahead:
    """One epoch's iterator, started in a thread that reads its first ``depth`` samples."""

    def __init__(self, source: Any, epoch: int, depth: int,
                 prepare: Callable[[Any], Any] | None = None,
                 plan: Callable[[list, list], Any] | None = None) -> None:
        self.epoch, self.buf, self.error = epoch, [], None
        self.prepare, self.plan = prepare, plan
        self.planned: Any = None  # plan(samples, pieces) of an epoch read whole
        self.prepared: dict[int, Any] = {}  # id(sample) -> prepare(sample), done ahead
        self.owners: dict[int, Any] = {}  # id(sample) -> sample: whose pieces they are
        self.it: Iterator[Any] | None = None
        self.done = False  # the epoch ended within the read-ahead
        self.thread = threading.Thread(target=self._read, args=(source, depth),
                                       name=f"epoch-read-ahead-{epoch}", daemon=True)
        self.thread.start()

    def _read(self, source: Any, depth: int) -> None:
        try:
            source.set_epoch(self.epoch)
            self.it = iter(source)
            for _ in range(depth):
                item = next(self.it, self)
                if item is self:
                    self.done = True
                    if self.plan is not None:  # its errors are bugs: re-raised, not skipped
                        self.planned = self.plan(self.buf, [self.prepared.get(id(s))
                                                            for s in self.buf])
                    return
                self.buf.append(item)
                if self.prepare is not None:
                    try:
                        self.prepared[id(item)] = self.prepare(item)
                        self.owners[id(item)] = item
                    except Exception:  # bad data: prepared again by the dispatcher, which
                        pass  # reports it as that sample's error
        except BaseException as e:  # re-raised in the consumer, with the loader's message
            self.error = e

    def items(self) -> Iterator[Any]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        yield from self.buf
        self.buf = []
        if not self.done and self.it is not None:
            yield from self.it


class EpochReadAhead:
    """Wraps a loader with ``set_epoch``: :meth:`epoch` gives one epoch's samples; once they are
    all drawn, the next epoch's first ``depth`` samples are read in a thread, at once (``auto``)
    or at the next :meth:`start_next`."""

    def __init__(self, source: Any, depth: int,
                 prepare: Callable[[Any], Any] | None = None, *, auto: bool = True,
                 plan: Callable[[list, list], Any] | None = None) -> None:
        self.source, self.depth, self.prepare, self.auto = source, depth, prepare, auto
        self.plan = plan  # plan(samples, prepared pieces or None each) -> plan or None
        self._next: _Ahead | None = None
        self._due: int | None = None  # the epoch to read ahead, not started yet
        # epoch() runs in the dispatcher's prefetch thread, start_next() in the trainer's
        self._lock = threading.Lock()
        self._prepared: dict[int, Any] = {}  # of the epoch being served
        self._owners: dict[int, Any] = {}

    def cached(self, prepare: Callable[[Any], Any]) -> Callable[[Any], Any]:
        """``prepare`` that first takes what the read-ahead already prepared for a sample (the
        dispatcher's decode and split: at a turnover of the mixed set it decoded the first
        8,192 examples in one thread while the GPU waited, 0.8-1.1 s in device call
        thru-final). The read-ahead must be given the same, deterministic ``prepare``."""
        def get(sample: Any) -> Any:
            # a sample drawn but never prepared (a resumed run skips those not in flight) left
            # its entry; once it is freed a later sample can have its id: the owner tells
            hit = self._prepared.pop(id(sample), None)
            if hit is not None and self._owners.pop(id(sample), None) is sample:
                return hit
            return prepare(sample)
        return get

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The samples of ``epoch`` (the loader's own order)."""
        with self._lock:  # a read-ahead not started by now never starts: this reads the epoch
            ahead, self._next, self._due = self._next, None, None
        self._prepared, self._owners = {}, {}
        if ahead is not None and ahead.epoch == epoch:
            ahead.thread.join()
            self._prepared, self._owners = ahead.prepared, ahead.owners
            yield from ahead.items()
        else:
            if ahead is not None:
                ahead.thread.join()  # never two readers of one loader at once
            self.source.set_epoch(epoch)
            yield from self.source
        self._drawn(epoch)

    def _drawn(self, epoch: int) -> None:
        """All of ``epoch`` has been drawn: the next epoch may be read ahead."""
        if self.depth > 0:
            with self._lock:
                self._due = epoch + 1
            if self.auto:
                self.start_next()

    def take_whole(self, epoch: int) -> Any:
        """The plan of ``epoch`` when it was read ahead whole and planned (``plan`` returned
        one), instead of :meth:`epoch` (its samples count as drawn); else None, and
        :meth:`epoch` serves it."""
        with self._lock:
            ahead = self._next
        if ahead is None or ahead.epoch != epoch:
            return None
        ahead.thread.join()  # as epoch() would: never two readers of one loader at once
        if not ahead.done or ahead.error is not None or ahead.planned is None:
            return None
        with self._lock:
            self._next = None
        self._prepared, self._owners = {}, {}
        self._drawn(epoch)
        return ahead.planned

    def whole(self, epoch: int) -> bool:
        """Whether all of ``epoch`` has been read ahead and prepared (the read-ahead has ended,
        without an error, within ``depth`` samples): it is then served from memory."""
        ahead = self._next
        return (ahead is not None and ahead.epoch == epoch and not ahead.thread.is_alive()
                and ahead.done and ahead.error is None)

    def start_next(self) -> bool:
        """Start reading the next epoch ahead if its predecessor has been drawn and it has not
        started yet (cheap otherwise: call it as often as convenient); True if it started."""
        with self._lock:
            if self._due is None:
                return False
            self._next = _Ahead(self.source, self._due, self.depth, self.prepare, self.plan)
            self._due = None
            return True

    def close(self) -> None:
        """Wait for a read-ahead in progress (no thread outlives the run)."""
        with self._lock:
            ahead, self._next, self._due = self._next, None, None
        if ahead is not None:
            ahead.thread.join()
