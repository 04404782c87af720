"""Epoch read-ahead: the next epoch's first samples are read while the current one drains.

At an epoch turnover the dispatcher admits ``max_in_flight`` examples of the new epoch before it
forms a batch, and the loader (shard order, shuffle buffer, reading) starts from nothing: on the
small text set (about four optimizer steps per epoch) that stall was most of the trainer's data
wait (132-259 ms at turnovers against ~10 ms in other steps, `bench train`'s ``data_wait_ms``).
Once an epoch's last sample has been drawn, while the dispatcher still runs the epoch's tail
batches, a thread selects the next epoch and reads its first ``depth`` samples; that epoch then
starts from them. The samples and their order are exactly those of an unwrapped source (one
reader, the same ``set_epoch``), so batches, checkpoints and resumption do not change.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any


class _Ahead:
    """One epoch's iterator, started in a thread that reads its first ``depth`` samples."""

    def __init__(self, source: Any, epoch: int, depth: int) -> None:
        self.epoch, self.buf, self.error = epoch, [], None
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
                    return
                self.buf.append(item)
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
    all drawn, the next epoch's first ``depth`` samples are read in a thread."""

    def __init__(self, source: Any, depth: int) -> None:
        self.source, self.depth = source, depth
        self._next: _Ahead | None = None

    def epoch(self, epoch: int) -> Iterator[Any]:
        """The samples of ``epoch`` (the loader's own order)."""
        ahead, self._next = self._next, None
        if ahead is not None and ahead.epoch == epoch:
            yield from ahead.items()
        else:
            if ahead is not None:
                ahead.thread.join()  # never two readers of one loader at once
            self.source.set_epoch(epoch)
            yield from self.source
        if self.depth > 0:
            self._next = _Ahead(self.source, epoch + 1, self.depth)

    def close(self) -> None:
        """Wait for a read-ahead in progress (no thread outlives the run)."""
        if self._next is not None:
            self._next.thread.join()
            self._next = None
