"""One shape bucket's queue (FIFO requests, their elementwise max shape, whether it is full), and
the record of an example in flight.

This is the dispatcher's hot path (every request is pushed once and taken once), so it is plain
attribute access and tuple arithmetic, no per-request allocation beyond the max shape.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from .dispatch_types import Request, Shape


def _emax(a: Shape, b: Shape) -> Shape:
    """Elementwise max of two shapes of the same length; returns an input when it dominates
    (no allocation: the common case on this hot path)."""
    if a == b:
        return a
    if len(a) == 1:
        return a if a[0] >= b[0] else b
    if len(a) == 2:
        a0, a1 = a
        b0, b1 = b
        if a0 >= b0 and a1 >= b1:
            return a
        if b0 >= a0 and b1 >= a1:
            return b
    return tuple(map(max, a, b))


class Bucket:
    """Pending requests of one mode and shape bucket.

    ``full`` means one more request of the bucket's current max shape would break the budget (or
    the sample cap is reached): the bucket can form a complete batch now.
    """

    __slots__ = ("mode", "key", "q", "maxshape", "maxcost", "full", "cost", "budget", "cap")

    def __init__(self, mode: str, key: tuple, cost: Callable[[Shape], int], budget: int,
                 cap: int | None) -> None:
        self.mode, self.key = mode, key
        self.q: deque[Request] = deque()
        self.maxshape: Shape | None = None
        self.maxcost = 0  # cost of maxshape
        self.full = False
        self.cost, self.budget, self.cap = cost, budget, cap

    def __repr__(self) -> str:
        return f"Bucket({self.mode!r}, {self.key}, pending={len(self.q)}, full={self.full})"

    def push(self, r: Request) -> bool:
        """Queue ``r``; True if the bucket was empty before."""
        q = self.q
        q.append(r)
        ms = self.maxshape
        if ms is None:
            self.maxshape, self.maxcost = r.shape, r.cost
        elif ms != r.shape:
            m = _emax(ms, r.shape)
            if m is not ms:
                self.maxshape, self.maxcost = m, self.cost(m)
        n = len(q)
        cap = self.cap
        self.full = (n + 1) * self.maxcost > self.budget or (cap is not None and n >= cap)
        return n == 1

    def pending_cost(self) -> int:
        """Padded cost of all pending requests together (to pick the fullest partial bucket)."""
        return len(self.q) * self.maxcost

    def take(self, limit: int | None = None) -> tuple[list[Request], Shape, int, int]:
        """Pop the longest FIFO prefix whose padded cost fits the budget (and the cap), and
        ``limit`` padded tokens when given (the consumer's room for this batch:
        :attr:`~.dispatch.Dispatcher.batch_limit`; ``full`` still refers to the budget).

        Returns (requests, padded shape, padded cost, sum of the requests' costs). Always takes
        at least one request (admission already rejected requests over the budget).
        """
        q, cost, cap = self.q, self.cost, self.cap
        budget = self.budget if limit is None else min(self.budget, limit)
        reqs: list[Request] = []
        ms: Shape | None = None
        each = total = 0
        while q:
            r = q[0]
            nm = r.shape if ms is None else _emax(ms, r.shape)
            c = cost(nm)
            n = len(reqs)
            if n and ((n + 1) * c > budget or (cap is not None and n >= cap)):
                break
            q.popleft()
            reqs.append(r)
            ms, each = nm, c
            total += r.cost
        # What remains: recompute its max shape when that costs no more than the batch did;
        # a longer queue keeps the old max, an upper bound that is tight within the bucket's
        # narrow width (it only guides scheduling: the next take() uses the real shapes).
        n = len(q)
        if n <= 2 * len(reqs):
            ms2: Shape | None = None
            for r in q:
                ms2 = r.shape if ms2 is None else _emax(ms2, r.shape)
            self.maxshape = ms2
            self.maxcost = 0 if ms2 is None else cost(ms2)
        self.full = bool(n) and ((n + 1) * self.maxcost > self.budget
                                 or (cap is not None and n >= cap))
        return reqs, ms, len(reqs) * each, total  # type: ignore[return-value]

    def extend(self, reqs: list[Request], shape: Shape, cost: int) -> bool:
        """Queue ``reqs`` at once, as that many :meth:`push` calls would (``shape``: their
        elementwise max, ``cost`` its cost; a whole source admitted together,
        :mod:`.dispatch_admit`). True if the bucket was empty before."""
        q = self.q
        was_empty = not q
        q.extend(reqs)
        ms = self.maxshape
        if ms is None:
            self.maxshape, self.maxcost = shape, cost
        else:
            m = _emax(ms, shape)
            if m is not ms:
                self.maxshape, self.maxcost = m, self.cost(m)
        n, cap = len(q), self.cap
        self.full = (n + 1) * self.maxcost > self.budget or (cap is not None and n >= cap)
        return was_empty

    def take_all(self) -> list[Request]:
        """Every pending request, leaving the bucket empty (a coalesced batch takes whole
        buckets along: :mod:`.dispatch_coalesce`)."""
        reqs = list(self.q)
        self.q.clear()
        self.maxshape, self.maxcost, self.full = None, 0, False
        return reqs


_NONE: list = []  # shared, never appended to: replaced by a fresh list on first use

# (block, part, mode, shape, inputs, targets): one request's worth of an example
Piece = tuple[int, int, str, tuple, Any, Any]


class Example:
    """An example in flight: its pieces (blocks, split blocks, generated blocks), the next one to
    request, its context state and what it collected. ``nsrc``: pieces that came from the
    sample (the rest were generated)."""

    __slots__ = ("eid", "key", "sample", "pieces", "nsrc", "next", "state", "outputs",
                 "generated")

    def __init__(self, eid: int, key: str, sample: Any = None,
                 pieces: list[Piece] | None = None) -> None:
        self.eid, self.key, self.sample = eid, key, sample
        # given at admission (one list fewer per example: ~2,600 a small text step)
        self.pieces: list[Piece] = [] if pieces is None else pieces
        self.nsrc = 0 if pieces is None else len(pieces)
        self.next = 0
        self.state: Any = None
        self.outputs: list = _NONE  # a list once there is something to keep (fewer allocations)
        self.generated: list = _NONE
