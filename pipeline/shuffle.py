"""Seeded orders: shard order per epoch and the bounded-buffer sample shuffle, over integers.

The buffer shuffle is the classic streaming one (fill a buffer of ``k`` items, emit a random one
and put the next item in its place) computed on positions instead of samples, so the same order
can be replayed without touching data: that is what makes resumption exact. It keeps the
streaming property that item ``t`` of the output is among the first ``t + k`` items of the input,
so a reader holds at most ``k`` samples in memory.
"""

from __future__ import annotations

import numpy as np


def rng_for(*parts: int) -> np.random.Generator:
    """A generator seeded by a tuple of non-negative integers (seed, epoch, rank, ...)."""
    return np.random.default_rng([int(p) for p in parts])


def shard_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The order shards are read in this epoch: a seeded permutation, or ``0..n-1``."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return rng_for(seed, epoch, 0x5A4D).permutation(n).astype(np.int64)


def buffer_order(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)`` as a ``k``-slot shuffle buffer would emit it."""
    if n <= 1 or k <= 1:
        return np.arange(n, dtype=np.int64)
    k = min(k, n)
    out = np.empty(n, dtype=np.int64)
    buf = list(range(k))
    picks = rng.integers(0, k, size=n - k).tolist()
    nxt = k
    for t, j in enumerate(picks):
        out[t] = buf[j]
        buf[j] = nxt
        nxt += 1
    tail = np.array(buf, dtype=np.int64)
    rng.shuffle(tail)
    out[n - k:] = tail
    return out
