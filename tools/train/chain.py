"""Chained epochs: the trainer's epochs as one dispatcher source (``train.chain_epochs``).

One dispatcher run per epoch drains every queue before the next epoch is admitted, so each epoch
ends in a string of small ``drain`` batches of thin buckets (a batch costs the host about the
same whatever its size: ~1,800 kernel launches, and with the processing stack its padded length
step by step). Chained, the trainer runs ONE dispatcher run over epoch ``e``, then ``e + 1``
(reshuffled by the loader's ``set_epoch``, as before), and so on: the next epoch's examples are
admitted as in-flight places free up (built a chunk at a time: ``dispatch.admission``,
``dispatch_admit.py``; one by one, 7.5-11 ms of a small text step), and an epoch's tail shares
batches with the next one's head (``bench train --simulate``, 4 epochs: the small preset's mixed
set 6.26 -> 2.47 batches per 65,536-token step, the text set 3.10 -> 1.52). Within an epoch the
samples and their order are the loader's. Chained batches grow larger than per-epoch ones (text
up to ~3,500 short examples), so they take at most ``train.chain_batch_samples`` examples
(:func:`training_dispatch`; H200 calls ep-1 and ep-2, README).

**Positions.** The dispatcher numbers a run's samples from the run's ``offset``; chained, epoch
``e + 1``'s first sample takes the position after epoch ``e``'s last. :class:`EpochChain`
records where each epoch starts as it reaches it (in the dispatcher's read-ahead thread).

**Reading at optimizer steps** (:meth:`EpochChain.gate`). Chained, the dispatcher's prefetch
thread reads and prepares the next samples whenever its queue has room, i.e. right after the
trainer's thread admitted some, while that thread launches the next batches: on a host-bound GPU
step the two compete for the GIL (in ``bench_turnover --spin-clock cpu`` chained runs lost ~40 ms
a step more to it than per-epoch ones, whose next epoch is read during the optimizer step). A
gated chain reads on only while fewer than ``low`` samples wait ahead of admission, or up to the
position the trainer releases (:meth:`release`) at each optimizer step (whose backward runs
mostly without the GIL). Which samples come, and in which order, does not change.

**Resumption.** A checkpoint stores :meth:`EpochChain.state`: ``[[epoch, start], ...]`` for the
epochs from the one holding the resume position (the oldest in-flight example, or the next
sample to draw) on. Resuming rebuilds the chain from that epoch at that start (the dispatcher
skips the positions it does not need, as within one epoch) and checks the later epochs start
where they did. A checkpoint of a per-epoch run (no chain state: its positions count from 0
within its epoch) resumes chained from its epoch at position 0.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

from blocklm.pipeline.dispatch_types import DispatchConfig

_END = object()


def training_dispatch(cfg: Any) -> DispatchConfig:
    """The training dispatcher's config of a run config: chained (``train.chain_epochs``), its
    ``max_batch_samples`` lowered to ``train.chain_batch_samples`` (chained batches grow larger
    than per-epoch ones: :class:`~blocklm.tools.train.config.TrainConfig`); else as given."""
    d, t = cfg.dispatch, cfg.train
    if not t.chain_epochs or t.chain_batch_samples is None:
        return d
    cap = min(c for c in (d.max_batch_samples, t.chain_batch_samples) if c is not None)
    return dataclasses.replace(d, max_batch_samples=cap)


class EmptyEpochError(ValueError):
    """An epoch of the training data yielded no sample: an endless chain would never end."""


class EpochChain:
    """The samples of ``source`` (a loader with ``set_epoch``), epoch ``first`` (its first sample
    at position ``offset``), then each next epoch, endlessly (or ``epochs`` of them). ``expect``
    maps epochs to the start positions a checkpoint recorded (checked when reached). Iterate it
    once (the dispatcher's read-ahead thread does); :meth:`epoch_of` and :meth:`state` may be
    called from any thread meanwhile."""

    def __init__(self, source: Any, first: int = 0, offset: int = 0, *,
                 expect: dict[int, int] | None = None, epochs: int | None = None,
                 name: str = "the training data") -> None:
        self.source, self.first, self.offset, self.epochs = source, first, offset, epochs
        self.name = name  # named in errors
        self._expect = dict(expect or {})
        self._lock = threading.Lock()
        self._epochs = [first]  # epochs reached, ascending, and where each starts
        self._starts = [offset]
        self._cond = threading.Condition(self._lock)
        self._drawn: Callable[[], int] | None = None  # gate(): the consumer's position
        self._low, self._allowed = 0, math.inf  # read freely below either
        self._released = False

    def __iter__(self) -> Iterator[Any]:
        e, pos = self.first, self.offset
        while self.epochs is None or e < self.first + self.epochs:
            if e != self.first:
                want = self._expect.get(e)
                if want is not None and want != pos:
                    raise ValueError(
                        f"resuming: epoch {e} of {self.name} starts at source position {pos}, "
                        f"the checkpoint recorded {want} (the data or the loader's settings "
                        f"changed since)")
                with self._lock:
                    self._epochs.append(e)
                    self._starts.append(pos)
            self.source.set_epoch(e)
            n, it = 0, iter(self.source)
            while True:
                if self._drawn is not None and pos + n >= self._allowed:
                    self._hold(pos + n)  # before the read: reading is the work to move
                sample = next(it, _END)
                if sample is _END:
                    break
                n += 1
                yield sample
            if n == 0:
                raise EmptyEpochError(f"epoch {e} of {self.name} yielded no samples: "
                                      f"nothing to train on")
            e, pos = e + 1, pos + n

    def gate(self, drawn: Callable[[], int], low: int) -> None:
        """From the first :meth:`release` on, read on only while fewer than ``low`` samples are
        read ahead of ``drawn()`` (the consumer's next position, read from the reading thread)
        or below the position last released (module docstring). Only for a chain read in
        another thread than ``drawn``'s: a consumer waiting on its own reader would wait 20 ms
        per check. ``low`` must exceed the samples the reading thread can hold without handing
        them over (a prefetcher's unfilled chunk, its decoders' window), or both wait."""
        with self._cond:  # it holds from the first release() on: before that a resumed run
            # skips positions it does not need, which drawn() does not count
            self._drawn, self._low = drawn, max(1, low)

    def release(self, upto: float = math.inf) -> None:
        """Let a gated chain read every position below ``upto`` (default: all, and ungated for
        good: call it before abandoning the reading thread, or it waits for a release that never
        comes). The first release starts the gating."""
        with self._cond:
            if not self._released or upto > self._allowed:
                self._allowed, self._released = upto, True
                self._cond.notify_all()

    def _hold(self, pos: int) -> None:
        drawn = self._drawn
        with self._cond:  # the consumer is polled: admission does not notify (no hook there)
            while pos >= self._allowed and pos - drawn() >= self._low:
                self._cond.wait(0.02)

    def epoch_of(self, pos: int) -> int:
        """The epoch of source position ``pos`` among the epochs reached (``first`` for a
        position before the chain's start; the last epoch reached for one past it)."""
        with self._lock:
            i = bisect.bisect_right(self._starts, pos) - 1
            return self._epochs[max(i, 0)]

    def start(self, epoch: int) -> int | None:
        """The source position of ``epoch``'s first sample; None if not reached yet."""
        with self._lock:
            i = bisect.bisect_left(self._epochs, epoch)
            return self._starts[i] if i < len(self._epochs) and self._epochs[i] == epoch else None

    def state(self, position: int, drawn: int) -> list[list[int]]:
        """``[[epoch, start], ...]`` of the epochs from the one holding ``position`` (where a
        resumed run must start reading) to the one holding ``drawn - 1`` (the newest admitted;
        epochs only read ahead are left out): for the checkpoint."""
        with self._lock:
            i = max(bisect.bisect_right(self._starts, position) - 1, 0)
            j = max(bisect.bisect_right(self._starts, drawn - 1), i + 1)
            return [[e, s] for e, s in zip(self._epochs[i:j], self._starts[i:j])]

    @staticmethod
    def resume_args(state: list[list[int]] | None, epoch: int) -> tuple[int, int, dict[int, int]]:
        """``(first epoch, its start, expected later starts)`` to rebuild a chain from a
        checkpoint's :meth:`state`; ``None`` (a per-epoch run's checkpoint): from ``epoch`` at
        position 0, where that run numbered the epoch's samples."""
        if not state:
            return epoch, 0, {}
        (first, start), rest = state[0], state[1:]
        return int(first), int(start), {int(e): int(s) for e, s in rest}
