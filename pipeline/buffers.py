"""Receive buffers for remote runs, reused across runs and passes.

A remote run (up to 2 MiB of neighbouring samples) used to arrive as a new ``bytes`` object:
for every run an allocation of fresh pages (each faulted in and zeroed by the kernel), and its
large payloads copied out into more fresh pages. Instead the read-ahead thread fills a buffer
taken from a :class:`RunBuffers` (``HTTPSource.readinto``), and the buffer is given back once its
run is cut.

The buffers are private anonymous mappings: slicing one gives ``bytes``, as slicing a local
shard's mapping does, so a remote run is cut by exactly the code that cuts a local one, large
payloads included, which are handed out as views of the buffer (``ViewBlock``). A buffer is
therefore written again only when nothing refers to it any more: every view of it holds a
reference to it (through its memoryview's buffer), so :meth:`RunBuffers.take` reuses a buffer
only if the pool's own is the last reference (CPython's reference count, exact and immediate).
A buffer still referenced stays with whoever holds its views, and is freed with the last one.
"""

from __future__ import annotations

import mmap
import sys
import threading

_refs = sys.getrefcount


class RunBuffers:
    """Buffers of ``size`` bytes (a larger one for a run above it), taken and given back by the
    thread that cuts runs; at most ``keep`` are kept for reuse. Passes in several threads may
    share one pool (a lock makes the check of a buffer and its taking one step). Not pickled:
    a DataLoader worker starts with none."""

    def __init__(self, size: int, keep: int = 4) -> None:
        self.size, self.keep = size, keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, n: int) -> mmap.mmap:
        """A buffer of at least ``n`` bytes nothing else refers to (the caller owns it until
        :meth:`give`)."""
        free = self._free
        if n <= self.size:
            with self._lock:
                for k in range(len(free) - 1, -1, -1):
                    # 2: the list's reference and getrefcount's argument; more: a view lives on
                    if _refs(free[k]) == 2:
                        return free.pop(k)
        return mmap.mmap(-1, max(n, self.size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)

    def give(self, buf: mmap.mmap) -> None:
        """Take back ``buf`` once its run is cut (views of it may still be alive: it is reused
        only when they are gone)."""
        if len(buf) != self.size:
            return  # a run above ``size`` (one large sample): let go
        free = self._free
        with self._lock:
            free.append(buf)
            if len(free) > self.keep:
                # keep those free now; one still viewed is left to its views (freed with them)
                held = [k for k in range(len(free)) if _refs(free[k]) > 2]
                del free[held[0] if held else 0]

    def __getstate__(self) -> dict:
        return {"size": self.size, "keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"], state["keep"])
