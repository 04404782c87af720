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
from collections.abc import Callable, Iterable, Iterator
from typing import Any

_END = object()


class _SourceFailed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


Item = tuple[int, Any, Any]  # (position in the source, sample, prepared pieces or an Exception)


def _prepared(source: Iterable[Any], offset: int, want: Callable[[int], bool] | None,
              prepare: Callable[[Any], Any]) -> Iterator[Item]:
    for pos, sample in enumerate(source, offset):
        if want is not None and not want(pos):
            continue
        try:
            pieces = prepare(sample)
        except Exception as e:  # bad data: reported by the dispatcher, never silently skipped
            pieces = e
        yield pos, sample, pieces


class Prefetcher:
    """Iterate ``(position, sample, prepare(sample))`` computed ``depth`` samples ahead in a
    thread (``depth == 0``: in the caller's thread). Call :meth:`close` when abandoning it."""

    def __init__(self, source: Iterable[Any], prepare: Callable[[Any], Any], *, depth: int = 256,
                 chunk: int = 32, offset: int = 0,
                 want: Callable[[int], bool] | None = None) -> None:
        self._items = _prepared(source, offset, want, prepare)
        self._depth = depth
        self._thread: threading.Thread | None = None
        if depth > 0:
            self._chunk = max(1, min(chunk, depth))
            self._q: queue.Queue = queue.Queue(maxsize=max(1, depth // self._chunk))
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._work, name="dispatch-prefetch",
                                            daemon=True)
            self._thread.start()

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
        if self._thread is None:
            yield from self._items
            return
        while True:
            got = self._q.get()
            if got is _END:
                return
            if isinstance(got, _SourceFailed):
                raise got.exc
            yield from got

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
        self._thread = None
