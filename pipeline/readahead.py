"""The read-ahead thread of a dataset, kept from pass to pass.

Remote runs are read by a helper thread while the calling thread cuts the previous run into
samples. Starting that thread and connecting it to the server anew every pass cost about as much
as reading a whole small dataset's first run (0.3-1.5 ms measured here, per pass), and the
thread's kept-alive connections could not be reused by the next pass. A :class:`ReadAhead`
keeps one thread, and with it its connections, for as long as its dataset lives: when the
dataset is collected (or :meth:`stop` is called) the thread closes its connections and ends.
It also keeps the first run of the pass expected next, read after the last pass
(:meth:`ReadAhead.keep_early`). :func:`fetch_run` is what the thread runs for each run.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterator
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


def fetch_run(o: Any, start: int, end: int, until: int, buf: Any,
              nxt: tuple[Any, int, int] | None = None, first: bool = True) -> Any:
    """Read bytes ``[start, end)`` of a (remote) shard ``o`` (a reader's open shard), in the
    read-ahead thread: the read releases the GIL, so it overlaps the cutting of the previous
    run in the calling thread. Into ``buf`` (from its start) when given, else as new ``bytes``; the runs that follow
    this one go on up to ``until`` (one request asks for them all). ``nxt``: the request
    after this one's, ``(source, start, until)``, sent ahead (its answer comes meanwhile):
    before this run is received if its request went out with an earlier run (``first``
    false), else after (a request of this thread drops the one sent ahead)."""
    if nxt is not None and not first:
        nxt[0].request_ahead(nxt[1], nxt[2])
    if buf is None:
        out = bytes(o.source.read(start, end - start))  # bytes() is a no-op for bytes
    else:
        with memoryview(buf) as mv:
            o.source.readinto(start, mv[:end - start], until)
        out = buf
    if nxt is not None and first:
        nxt[0].request_ahead(nxt[1], nxt[2])
    return out


def next_request(run: tuple | None) -> tuple[Any, int, int] | None:
    """``(source, start, until)`` of the request that ``run`` (the first of a request) makes,
    if it is an HTTP read into a buffer."""
    if run is None or not run[2].into or run[2].error is not None:
        return None
    return run[2].source, run[3], run[6]


def pairs(it: Iterator) -> Iterator[tuple[Any, Any]]:
    """``(item, the item after it or None)`` for each item of ``it``."""
    cur = next(it, None)
    while cur is not None:
        nxt = next(it, None)
        yield cur, nxt
        cur = nxt
