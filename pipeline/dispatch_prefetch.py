"""Read-ahead for the dispatcher: a background thread pulls samples and prepares (decodes) their
blocks into a bounded queue, so the runner does not wait on I/O or decoding in steady state.

Order is preserved (one worker, FIFO queue), so prefetching never changes which batches the
dispatcher forms. Samples are handed over in chunks to keep queue locking off the per-sample
path. Errors of the source itself are re-raised in the consumer; errors preparing one sample are
handed over as that sample's result (the dispatcher counts and reports them).
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

_END = object()


class _SourceFailed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


Item = tuple[int, Any, Any]  # (position in the source, sample, prepared pieces or an Exception)


def _safe(prepare: Callable[[Any], Any], sample: Any) -> Any:
    try:
        return prepare(sample)
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
    when ``workers > 1``. Call :meth:`close` when abandoning it."""

    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], *, depth: int = 256,
                 chunk: int = 32, offset: int = 0, want: Callable[[int], bool] | None = None,
                 workers: int = 1) -> None:
        self._lock = threading.Lock()
        self._raw: deque[tuple[int, Any]] = deque()  # pulled from the source, not yet taken
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
        while True:
            with self._lock:
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
            return list(self._raw), None if source_state is None else source_state()

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
        try:
            for item in self._items:
                buf.append(item)
                # hand over a full chunk, or sooner while the consumer is starving
                if len(buf) >= self._chunk or self._q.empty():
                    if not self._put(buf):
                        return
                    buf = []
            if buf and not self._put(buf):
                return
            self._put(_END)
        except BaseException as e:  # the source failed: the consumer re-raises it
            self._put(_SourceFailed(e))

    def __iter__(self) -> Iterator[Item]:
        raw = self._raw
        if self._thread is None:
            for item in self._items:
                raw.popleft()
                yield item
            return
        while True:
            got = self._q.get()
            if got is _END:
                return
            if isinstance(got, _SourceFailed):
                raise got.exc
            for item in got:
                raw.popleft()  # taken: no longer the read-ahead's
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
