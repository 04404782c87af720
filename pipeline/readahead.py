"""The read-ahead thread of a dataset, kept from pass to pass.

Remote runs are read by a helper thread while the calling thread cuts the previous run into
samples. Starting that thread and connecting it to the server anew every pass cost about as much
as reading a whole small dataset's first run (0.3-1.5 ms measured here, per pass), and the
thread's kept-alive connections could not be reused by the next pass. A :class:`ReadAhead`
keeps one thread, and with it its connections, for as long as its dataset lives: when the
dataset is collected (or :meth:`stop` is called) the thread closes its connections and ends.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any


def _stop(pool: ThreadPoolExecutor, close: Callable[[], None] | None) -> None:
    try:
        if close is not None:
            pool.submit(close)  # runs in the thread, after the reads already queued
        pool.shutdown(wait=False)  # never joins: this may run in the thread itself (gc)
    except RuntimeError:  # the interpreter is exiting: its threads are stopped already
        pass


class ReadAhead:
    """One helper thread, started on the first :meth:`submit` (in each process: a forked
    DataLoader worker starts its own); ``close`` runs in it last (the opener's
    ``close_thread``: its kept-alive connections). Not pickled with its thread."""

    def __init__(self, close: Callable[[], None] | None = None) -> None:
        self._close = close
        self._pool: ThreadPoolExecutor | None = None
        self._pid = -1
        # the first run of the pass expected next, read ahead after the last pass:
        # ((url, start, end, until), future, buffer), taken by that pass if it comes
        self._early: tuple[tuple[str, int, int, int], Future, Any] | None = None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is None or self._pid != os.getpid():
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="blocklm-read")
            self._pid = os.getpid()
            # the thread must not outlive its dataset: stopped when this object is collected
            weakref.finalize(self, _stop, self._pool, self._close)
        return self._pool.submit(fn, *args)

    def stop(self) -> None:
        """End the thread now (after the reads already queued), closing its connections."""
        if self._pool is not None and self._pid == os.getpid():
            _stop(self._pool, self._close)
        self._pool = None

    def __getstate__(self) -> dict[str, Any]:
        return {"_close": self._close, "_pool": None, "_pid": -1, "_early": None}

    def keep_early(self, key: tuple[str, int, int, int], fut: Future, buf: Any) -> None:
        """Keep the read ``fut`` (into ``buf``) of the run ``key`` = (url, start, end, until)
        for the next pass (:meth:`take_early`)."""
        self._early = (key, fut, buf)

    def take_early(self, key: tuple[str, int, int, int]) -> Future | None:
        """The read kept by :meth:`keep_early` if it is of run ``key`` and of this process's
        thread (a forked worker's copy would wait for a thread it does not have); the kept
        read is let go either way."""
        early, self._early = self._early, None
        if early is None or early[0] != key or self._pid != os.getpid():
            return None
        return early[1]
