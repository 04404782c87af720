"""Coalescing: a batch its own bucket cannot fill takes whole buckets of its mode with it.

Why. A batch that runs before its bucket is full (``ttl``, ``stall``, ``drain``) is small, and a
runner's host work costs about the same per batch whatever its size (the ``small`` preset on the
H200: ~1,800 kernel launches a batch). When a whole small epoch is in flight at once (the trainer
admits an epoch read ahead whole), nearly every batch is a drain: a mixed epoch of
``data/gpu_mixed4`` ran 52 batches of ~8,500 padded tokens under a 65,536-token budget, one per
bucket and per wave of second blocks (``bench train --simulate``). Buckets of neighbouring shapes
can share a batch for some padding: the question is how much padding one batch fewer is worth.

Rule. ``coalesce_tokens`` (``DispatchConfig``; ``mode_coalesce_tokens`` per mode) is that
price: ``lam`` padded tokens per batch saved. The mode's non-full pending buckets (the batch just taken from the seed counts as one) are
sorted by their largest shape's cost, longest first, and split into runs of consecutive buckets
(each run fits the budget, the sample cap and the consumer's ``batch_limit`` or the mode's
``mode_batch_limit``) minimising ``padding + lam * runs`` by dynamic
programming over the buckets (``O(buckets^2)``: narrow buckets, ~25-80 per mode). The run that
holds the seed is the batch: every request of its buckets goes with it. Padding is estimated from
the buckets' max shapes (upper bounds); the batch's real padded shape is the elementwise max of
its requests'. For N-dimensional shapes the run's cost is that of the elementwise max, so an
image ``(480, 320)`` and ``(320, 480)`` only share a batch when ``lam`` outweighs the padding.
Deterministic: it reads only the queues and the buckets' keys (ties: lower key first).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .dispatch_buckets import Bucket, _emax
from .dispatch_types import Request, Shape

if TYPE_CHECKING:
    from .dispatch import Dispatcher


def _runs(units: list[tuple], cost, budget: int, cap: int | None, lam: int) -> list[int]:
    """Ends (exclusive) of the optimal runs of ``units`` = ``[(n, tokens, maxshape), ...]``
    sorted longest first: ``padding + lam * runs`` minimal, each run within the budget/cap."""
    m = len(units)
    best = [0.0] * (m + 1)
    nxt = [m] * (m + 1)
    for i in range(m - 1, -1, -1):
        n = tok = 0
        ms = None
        best_i, best_j = None, i + 1
        for j in range(i, m):
            un, ut, us = units[j]
            ms = us if ms is None else _emax(ms, us)
            n, tok = n + un, tok + ut
            c = cost(ms)
            if j > i and (n * c > budget or (cap is not None and n > cap)):
                break
            v = n * c - tok + lam + best[j + 1]
            if best_i is None or v < best_i:
                best_i, best_j = v, j + 1
        best[i], nxt[i] = best_i, best_j
    ends, i = [], 0
    while i < m:
        i = nxt[i]
        ends.append(i)
    return ends


def coalesce_into(d: Dispatcher, seed: Bucket, reason: str, reqs: list[Request], shape: Shape,
                  padded: int, total: int) -> tuple[Shape, int, int]:
    """Extend the batch ``reqs`` just taken from ``seed`` for ``reason`` (padded ``shape`` and
    cost, ``total`` = the requests' own costs) with the other buckets of its run under
    ``d.config.coalesce_of(mode)`` (module docstring; ``None``, or a full batch: unchanged);
    emptied buckets leave ``d._nonempty`` (the dispatcher's insertion-ordered set of non-empty
    buckets). Returns the batch's (padded shape, padded cost, sum of costs)."""
    nonempty, lam = d._nonempty, d.config.coalesce_of(seed.mode)
    if lam is None or reason == "full" or not reqs:
        return shape, padded, total
    others = [b for b in nonempty if b.mode == seed.mode and b is not seed and not b.full]
    if not others:
        return shape, padded, total
    cost = seed.cost
    # (cost of max shape, key, bucket or None for the seed's batch, n, tokens, max shape)
    units = [(cost(b.maxshape), b.key, b, len(b.q), sum(r.cost for r in b.q), b.maxshape)
             for b in others]
    units.append((padded // len(reqs), seed.key, None, len(reqs), total, shape))
    units.sort(key=lambda u: (-u[0], u[1]))
    limit = d.limit_of(seed.mode)
    budget = seed.budget if limit is None else max(min(seed.budget, limit), padded)
    ends = _runs([u[3:] for u in units], cost, budget, seed.cap, lam)
    start = 0
    for end in ends:
        if any(u[2] is None for u in units[start:end]):
            break
        start = end
    for u in units[start:end]:
        b = u[2]
        if b is None:
            continue
        taken = b.take_all()
        for r in taken:
            shape = _emax(shape, r.shape)
            total += r.cost
        reqs.extend(taken)
        nonempty.pop(b, None)
    return shape, len(reqs) * cost(shape), total
