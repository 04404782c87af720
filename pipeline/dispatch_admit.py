"""Admission: one example at a time (:func:`new_example`), from examples built ahead a chunk at a
time (:func:`admission_builder`, :func:`admit_from`), or a whole source at once from records
built ahead in any thread (:func:`plan_admission`, :func:`admit_planned`).

**Built a chunk at a time** (every run but a planned one; chained epochs admit all their
examples so). One by one (``DispatchConfig.admission="one_by_one"``, the path before), each
example cost the admitting (trainer's) thread a generator step, ``new_example`` and ``_issue``,
an :class:`Example`, a :class:`Request`, a cost and bucket lookup and a push (7.5-11 ms a step of
the small text set, ``bench_turnover --spin-clock cpu``). ``build`` makes each clean sample's
example and first request (cost, bucket key; memoised per shape), ``seal`` groups a chunk's
requests by bucket (as :func:`plan_admission` groups a source's); :func:`admit_from` only stamps
each request's time and sequence number, puts the examples in flight and pushes the requests or
appends each group to its bucket (looked up, or created there: buckets and all running state
stay the admitting thread's). ``"inline"`` (default) builds in the admitting thread as each chunk
comes; ``"prefetch"`` builds and seals in the prefetch thread (which then also drops finished
examples): less of the admitting thread, but slower on the H200, whose launches release the GIL
to it (pipeline/DISPATCH.md). Samples that are not clean (below) take :func:`new_example` in
their place in the order, counted and reported as before.

When every sample of a run's source is in memory and prepared before the run starts (the
trainer's epoch read ahead whole: the small text set's 7,222 examples, all admitted at each
epoch turnover), admitting them one by one cost the trainer's thread ~5-7 us per example:
iterating the read-ahead and the prefetcher's generators, an :class:`Example` and a
:class:`Request` each, a bucket push, and the garbage collections those allocations trigger
(40-55 ms a turnover in ``python -m blocklm.tools.bench_turnover``, while the host-bound step
waited). :func:`plan_admission` builds everything that does not depend on the dispatcher's
running state (the examples, their first requests, costs, bucket keys, the requests grouped by
bucket) wherever the samples were read, e.g. the epoch read-ahead's thread;
:func:`admit_planned`, in the run, only stamps each request's enqueue time and order and
appends each group to its bucket.

The outcome is exactly that of admitting the samples one by one: examples enter in source order
with their source positions, request sequence numbers follow that order, buckets are created and
become non-empty in the order of their first request (the scan's tie-breaks depend on it), and a
bucket's max shape, cost and fullness are those after its last push (the elementwise max does not
depend on the order). Only clean sources get a plan: every sample prepared with at least one
piece, each first piece within its mode's budget, every mode with a runner, no ``init_state``.
Anything else (``None``) is admitted one by one, where it is counted and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from .dispatch_buckets import Example, _emax
from .dispatch_types import DispatchError, PrepareError, Request

if TYPE_CHECKING:
    from .dispatch import Dispatcher
    from .dispatch_prefetch import Item, Prefetcher

_MEMO_CAP = 1 << 16  # shapes memoised per mode (adversarial data: ever-new shapes)


class Admission:
    """A whole source prepared for admission by one dispatcher (:func:`plan_admission`), used by
    at most one run. Iterating it gives its samples: a run that cannot admit it at once (a
    resumed run, too few free places in flight, another offset) reads them as a plain source."""

    __slots__ = ("owner", "offset", "samples", "examples", "requests", "groups", "used")

    def __init__(self, owner: Dispatcher, offset: int, samples: list) -> None:
        self.owner, self.offset, self.samples = owner, offset, samples
        self.examples: dict[int, Example] = {}  # position -> example, in source order
        self.requests: list[Request] = []  # each example's first request, in source order
        # (bucket key, its requests in order, their elementwise max shape, its cost), ordered
        # by each bucket's first request
        self.groups: list[tuple[tuple, list[Request], tuple, int]] = []
        self.used = False

    def __iter__(self):
        if self.used:
            raise ValueError("an admission plan is admitted once (or read once as a source)")
        self.used = True
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def new_example(d: Dispatcher, pos: int, sample: Any, pieces: Any) -> Example | None:
    """Admit one sample at source position ``pos`` into ``d`` (one by one: ``d._admit``):
    in flight and counted; rejected (``pieces`` an exception) or finished (no pieces) at once,
    else returned for its first request."""
    ex = Example(pos, sample.key, sample)
    d._in_flight[pos] = ex
    d.counts["admitted"] += 1
    if isinstance(pieces, Exception):
        d._reject(ex, pieces if isinstance(pieces, DispatchError)
                  else PrepareError(str(pieces), key=sample.key))
        return None
    ex.pieces = pieces
    ex.nsrc = len(pieces)
    if d._init_state is not None:
        ex.state = d._init_state(sample)
    if not pieces:
        d._finish(ex)
        return None
    return ex


def plan_admission(d: Dispatcher, samples: Sequence[Any], pieces: Sequence[Any],
                   offset: int = 0) -> Admission | None:
    """The admission of ``samples`` (source positions from ``offset``) by ``d``, given each
    sample's prepared pieces (``d``'s prepare; ``None`` or an exception where it failed); None
    when the source is not clean (module docstring). Reads only ``d``'s fixed settings: safe in
    a thread while ``d`` runs."""
    if d._init_state is not None or len(pieces) != len(samples):
        return None
    build, seal = _first_requests(d)
    plan = Admission(d, offset, list(samples))
    sealed = seal(build(item) for item in zip(range(offset, offset + len(samples)),
                                              plan.samples, pieces))
    if sealed is None:
        return None
    plan.examples, plan.requests, plan.groups = sealed
    return plan


def usable(d: Dispatcher, source: Any, offset: int) -> Admission | None:
    """``source`` if it is a plan ``d`` can admit at once now, else None."""
    if (isinstance(source, Admission) and source.owner is d and not source.used
            and source.offset == offset
            and len(d._in_flight) + len(source.examples) <= d.config.max_in_flight):
        return source
    return None


def admit_planned(d: Dispatcher, plan: Admission) -> None:
    """Admit every example of ``plan`` into ``d`` (see :func:`usable`), as ``d._admit`` would
    one by one; the plan is spent (its references dropped)."""
    if plan.used:
        raise ValueError("an admission plan is admitted once")
    plan.used = True
    _enqueue(d, plan.examples, plan.requests, plan.groups, d._now())
    if plan.samples:
        d.drawn = plan.offset + len(plan.samples)
    plan.samples, plan.examples, plan.requests, plan.groups = [], {}, [], []


def admission_builder(d: Dispatcher) -> dict[str, Callable[[Any], Any]]:
    """``{"build": build, "seal": seal}`` for ``d``'s :class:`Prefetcher`: ``build(item)`` is
    ``(example, its first request, bucket key)`` of a clean sample (as :func:`plan_admission`
    defines it), else None (the admitting thread takes :func:`new_example`, which rejects,
    finishes or raises as before); ``seal(built)`` of a chunk all built is ``(examples by
    position, requests, [(bucket key, its requests, their max shape, its cost)] in the order of
    each bucket's first request)``, else None. Both read only ``d``'s fixed settings. ``{}``
    (nothing built) with ``init_state`` or ``d.config.admission == "one_by_one"``."""
    if d._init_state is not None or d.config.admission == "one_by_one":
        return {}
    build, seal = _first_requests(d)
    return {"build": build, "seal": seal}


def _enqueue(d: Dispatcher, exs: dict[int, Example], reqs: list[Request],
             groups: list[tuple[tuple, list[Request], Any, int]], now: float) -> None:
    """Put built examples in flight and their first requests (``reqs``, in source order) in
    their buckets, a group at a time (``groups`` as :func:`_first_requests`' ``seal`` makes
    them): as many one-by-one admissions would."""
    seq = d._seq
    for r in reqs:  # the only per-example work left in the admitting thread
        r.t, r.seq = now, seq
        seq += 1
    d._seq = seq
    d._in_flight.update(exs)
    d.counts["admitted"] += len(exs)
    nonempty = d._nonempty
    for bkey, greqs, gshape, gcost in groups:
        b = d._bucket(bkey)
        if b.extend(greqs, gshape, gcost):
            nonempty[b] = None


def _first_requests(d: Dispatcher) -> tuple[Callable[[Item], Any], Callable[[Iterable], Any]]:
    """``(build, seal)`` (:func:`admission_builder`) whatever ``d.config.admission`` says."""
    mcs, spec, budget = d._mc, d._spec, d._budget
    seen: dict[str, dict] = {m: {} for m in mcs}  # shape -> (cost, bucket key) or None: over

    def build(item: Item) -> Any:
        pos, sample, got = item
        if type(got) is not list or not got:
            return None
        try:
            block, part, mode, shape, inputs, targets = got[0]
            memo = seen.get(mode)
            if memo is None:
                return None
            hit = memo.get(shape, False)
            if hit is False:
                c = mcs[mode](shape)
                hit = (c, (mode, spec[mode].key(shape))) if c <= budget[mode] else None
                if len(memo) < _MEMO_CAP:
                    memo[shape] = hit
            if hit is None:
                return None
            c, bkey = hit
            ex = Example(pos, sample.key, sample, got)
            return ex, Request(pos, ex.key, block, part, mode, shape, None, inputs, targets, c,
                               0, 0, ex), bkey
        except Exception:  # odd data (unhashable shape, a failing cost): the admitting
            return None  # thread meets it one by one, as before, and reports it

    def seal(built: Iterable) -> Any:
        exs: dict[int, Example] = {}
        reqs: list[Request] = []
        groups: dict[tuple, list] = {}  # insertion order: each bucket's first request
        try:
            for got in built:
                if got is None:
                    return None
                ex, r, bkey = got
                exs[ex.eid] = ex
                reqs.append(r)
                g = groups.get(bkey)
                if g is None:
                    groups[bkey] = [bkey, [r], r.shape]
                else:
                    g[1].append(r)
                    g[2] = _emax(g[2], r.shape)
            return exs, reqs, [(k, rs, ms, mcs[k[0]](ms)) for k, rs, ms in groups.values()]
        except Exception:  # (a cost failing on a max shape) request by request instead
            return None

    return build, seal


class Feed:
    """A run's prefetched items as the admitting thread takes them: the chunk at hand (items,
    and what :func:`admission_builder` built for them or None) and the next one's index;
    ``build`` builds each chunk's items as it comes, in the admitting thread ("inline")."""

    __slots__ = ("pf", "build", "items", "built", "sealed", "i")

    def __init__(self, pf: Prefetcher, build: Callable[[Item], Any] | None = None) -> None:
        self.pf, self.build = pf, build
        self.items: list[Item] = []
        self.built: list | None = None
        self.sealed: Any = None
        self.i = 0

    def refill(self) -> bool:
        """Take the next chunk; False at the source's end."""
        got = self.pf.next_chunk()
        if got is None:
            return False
        self.items, self.built, self.sealed = got
        if self.build is not None:
            self.built = list(map(self.build, self.items))
        self.i = 0
        return True

    def __iter__(self) -> Iterator[Item]:
        """The items one at a time (a resumed run's in-flight examples), each taken."""
        while self.i < len(self.items) or self.refill():
            item = self.items[self.i]
            self.i += 1
            self.pf.taken(1)
            yield item


def admit_from(d: Dispatcher, feed: Feed) -> None:
    """Admit from ``feed`` until ``d.config.max_in_flight`` examples are in flight or the source
    ends: as one-by-one admission would (the same examples, sequence numbers, enqueue times and
    bucket order), built examples in runs, the others through :func:`new_example`."""
    k, in_flight = d.config.max_in_flight, d._in_flight
    buckets, nonempty, now = d._buckets, d._nonempty, d._now()
    while len(in_flight) < k:
        items, built, i = feed.items, feed.built, feed.i
        if i >= len(items):
            if not feed.refill():
                d._exhausted = True
                return
            continue
        # each built example adds one to those in flight: at most this many fit
        stop, j = min(len(items), i + k - len(in_flight)), i
        if i == 0 and stop == len(items) and feed.sealed is not None:  # the whole chunk
            _enqueue(d, *feed.sealed, now)
            d.drawn = items[-1][0] + 1
            feed.pf.taken(stop)
            feed.i = stop
            continue
        if built is not None:
            seq = d._seq
            while j < stop:
                got = built[j]
                if got is None:
                    break
                ex, r, bkey = got
                r.t, r.seq = now, seq
                seq += 1
                in_flight[ex.eid] = ex
                b = buckets.get(bkey)
                if b is None:
                    b = d._bucket(bkey)
                if b.push(r):
                    nonempty[b] = None
                j += 1
            if j > i:
                d._seq = seq
                d.counts["admitted"] += j - i
                d.drawn = items[j - 1][0] + 1
                feed.pf.taken(j - i)
                feed.i = j
        if j < stop:  # not built: one by one, in its place
            pos, sample, pieces = items[j]
            feed.i = j + 1
            feed.pf.taken(1)
            d.drawn = pos + 1
            ex = new_example(d, pos, sample, pieces)
            if ex is not None:
                d._issue(ex, now)
