"""Read-ahead for the dispatcher: a background thread pulls samples and prepares (decodes) their
blocks into a bounded queue, so the runner does not wait on I/O or decoding in steady state.

Order is preserved (one worker, FIFO queue), so prefetching never changes which batches the
dispatcher forms. Samples are handed over in chunks to keep queue locking off the per-sample
path, and the consumer walks a chunk's list itself (:meth:`Prefetcher.next_chunk`,
:meth:`Prefetcher.taken`): a generator step per sample cost the admitting thread ~0.5 us each.
``build(item)``, when given, runs in the worker on every item after its preparation and its
result is handed over beside it, and ``seal(built)`` on each chunk's results before the hand-over
(the dispatcher builds each example's first request there and groups a chunk's requests by
bucket: :func:`~.dispatch_admit.admission_builder`). Errors of the source itself are re-raised
in the consumer; errors preparing one sample are handed over as that sample's result (the
dispatcher counts and reports them).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from blocklm.formats.errors import CodecUnavailableError

_END = object()
MAX_GRAVES = 16  # lists buried (bury) and not yet dropped: past it the consumer drops its own


class _SourceFailed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


Item = tuple[int, Any, Any]  # (position in the source, sample, prepared pieces or an Exception)


def _safe(prepare: Callable[[Any], Any], sample: Any) -> Any:
    try:
        return prepare(sample)
    except CodecUnavailableError:  # no decoder at all: the run stops (re-raised in the consumer)
        raise
    except Exception as e:  # bad data: reported by the dispatcher, never silently skipped
        return e


def _prepared(wanted: Iterable[tuple[int, Any]], prepare: Callable[[Any], Any], workers: int = 1,
              window: int = 64) -> Iterator[Item]:
    if workers <= 1:
        for pos, sample in wanted:
            yield pos, sample, _safe(prepare, sample)
        return
    # Several decoders (PIL, soundfile and zstd release the GIL while decoding); results are
    # still handed over in source order, so batches do not depend on which decoder was faster.
    with ThreadPoolExecutor(workers, thread_name_prefix="dispatch-decode") as pool:
        pending: deque = deque()
        for pos, sample in wanted:
            pending.append((pos, sample, pool.submit(_safe, prepare, sample)))
            if len(pending) >= window:
                p, s, f = pending.popleft()
                yield p, s, f.result()
        while pending:
            p, s, f = pending.popleft()
            yield p, s, f.result()


class Prefetcher:
    """Iterate ``(position, sample, prepare(sample))`` computed ``depth`` samples ahead in a
    thread (``depth == 0``: in the caller's thread), with ``workers`` decoder threads under it
    when ``workers > 1``; or take them a chunk at a time (:meth:`next_chunk`), each chunk with
    ``build(item)`` of its items and ``seal`` of those (module docstring). Call :meth:`close`
    when abandoning it."""

    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], *, depth: int = 256,
                 chunk: int = 32, offset: int = 0, want: Callable[[int], bool] | None = None,
                 workers: int = 1, build: Callable[[Item], Any] | None = None,
                 seal: Callable[[list], Any] | None = None) -> None:
        self._lock = threading.Lock()
        self._build = build
        self._seal = seal if build is not None else None
        self._ended = False
        self._graves: deque[Any] = deque()  # bury(): dropped by the worker before its next read
        self._worker_done = False
        self._raw: deque[tuple[int, Any]] = deque()  # pulled from the source, not yet popped
        # the first (_ntaken - _npopped) of _raw were taken: popped by the reading thread
        # (taken()), where the long-untouched tuples' deallocation costs the consumer nothing
        self._ntaken = self._npopped = 0
        self._items = _prepared(self._pull(source, offset, want), prepare,
                                workers if depth > 0 else 1, max(1, depth))
        self._depth = depth
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._chunk = max(1, min(chunk, depth))
            self._q: queue.Queue = queue.Queue(maxsize=max(1, depth // self._chunk))
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._work, name="dispatch-prefetch",
                                            daemon=True)
            self._thread.start()

    def _pull(self, source: Iterable[Any], offset: int,
              want: Callable[[int], bool] | None) -> Iterator[tuple[int, Any]]:
        """The wanted ``(position, sample)`` of the source, each recorded as pulled-not-taken
        under the lock, so :meth:`snapshot` never misses a sample in transit."""
        it = enumerate(source, offset)
        graves = self._graves
        while True:
            while graves:  # what the consumer buried is deallocated here, in the worker
                graves.popleft()
            with self._lock:
                self._pop_taken()
                got = next(it, None)
                while got is not None and want is not None and not want(got[0]):
                    got = next(it, None)
                if got is None:
                    return
                self._raw.append(got)
            yield got

    def snapshot(self, source_state: Callable[[], Any] | None = None) -> tuple[list, Any]:
        """``([(position, sample), ...] pulled from the source but not yet taken, the source's
        state)``, both at the same instant (the reader is held between two samples)."""
        with self._lock:
            skip = self._ntaken - self._npopped
            return (list(itertools.islice(self._raw, skip, None)),
                    None if source_state is None else source_state())

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _work(self) -> None:
        buf: list[Item] = []
        build, seal = self._build, self._seal
        built: list | None = None if build is None else []
        try:
            for item in self._items:
                buf.append(item)
                if built is not None:
                    built.append(build(item))
                # hand over a full chunk, or sooner while the consumer is starving
                if len(buf) >= self._chunk or self._q.empty():
                    if not self._put((buf, built, seal and seal(built))):
                        return
                    buf, built = [], None if build is None else []
            if buf and not self._put((buf, built, seal and seal(built))):
                return
            self._put(_END)
        except BaseException as e:  # the source failed: the consumer re-raises it
            self._put(_SourceFailed(e))
        finally:
            self._worker_done = True

    def bury(self, dead: Any) -> bool:
        """Hand over ``dead`` (objects the consumer no longer needs) for the worker to drop
        before it reads its next sample, so their deallocation runs in the worker (a chained
        run's finished examples with their samples and arrays: ~2 ms of a small text step in
        the trainer's thread, ``bench_turnover --spin-clock cpu``; a gated chain reads at
        optimizer steps). False, and the caller drops them, without a running worker or with
        :data:`MAX_GRAVES` handed over and not yet dropped (memory stays bounded)."""
        if self._thread is None or self._worker_done or len(self._graves) >= MAX_GRAVES:
            return False
        self._graves.append(dead)
        return True

    def next_chunk(self) -> tuple[list[Item], list | None, Any] | None:
        """The next ``(items, [build(item) for item in items] or None without build, seal of
        that or None)``, None at the end. Its items stay the read-ahead's (:meth:`snapshot`)
        until :meth:`taken`."""
        if self._ended:
            return None
        if self._thread is None:  # one at a time: the source is read no further than before
            item = next(self._items, None)
            if item is None:
                self._ended = True
                return None
            if self._build is None:
                return [item], None, None
            built = [self._build(item)]
            return [item], built, self._seal and self._seal(built)
        got = self._q.get()
        if got is _END:
            self._ended = True
            return None
        if isinstance(got, _SourceFailed):
            self._ended = True
            raise got.exc
        return got

    def taken(self, n: int) -> None:
        """The consumer took the next ``n`` items handed over: no longer the read-ahead's.
        Without ``build`` they are popped here; with it, by the reading thread before its next
        read, or here once it reads no more. Never under the lock: the reader holds it while
        its source waits (a gated chain waits for this very consumer)."""
        if self._build is not None:
            self._ntaken += n  # written in the consumer's thread only
            if not self._worker_done:
                return
            n, self._npopped = self._ntaken - self._npopped, self._ntaken  # reader stopped
        popleft = self._raw.popleft  # deque operations are atomic; the reader only appends
        for _ in range(n):
            popleft()

    def _pop_taken(self) -> None:  # under the lock; taken() may add to _ntaken meanwhile
        n, popleft = self._ntaken, self._raw.popleft
        for _ in range(n - self._npopped):
            popleft()
        self._npopped = n

    def __iter__(self) -> Iterator[Item]:
        while True:
            got = self.next_chunk()
            if got is None:
                return
            for item in got[0]:
                self.taken(1)
                yield item

    def close(self) -> None:
        """Stop the worker (it may be blocked on a full queue) and wait for it briefly."""
        if self._thread is None:
            return
        self._stop.set()
        try:
            while True:
                self._q.get_nowait()
        except queue.Empty:
            pass
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._items.close()  # shuts the decoder pool down now, not at garbage collection
        self._thread = None
        self._graves.clear()
