"""Dispatcher state for training resumption: ``Dispatcher.state_dict()`` / ``load_state_dict()``.

Taken between steps (after ``run`` yields), the state holds: the logical clock, the request
sequence counter, ``drawn`` (the next source position), the metrics accumulators and counters,
and every example in flight as ``{example (its source position), key, next (piece index),
state (its context, opaque: e.g. tensors, saved as given), t, seq (its pending request's enqueue
time and order), extra (generated pieces), outputs, generated}``. Nothing prefetched but not yet
admitted is in it: those samples are read again.

To resume: build a dispatcher with the same runners, buckets, cost and config, call
``load_state_dict(state)``, then ``run(source, offset=p)`` with the same source order starting at
``p <= Dispatcher.resume_position(state)`` (the smallest in-flight position). Positions before
``drawn`` that were not in flight are skipped without being prepared; the in-flight examples are
rebuilt and their requests re-queued with their saved time and order, so with the logical clock
the resumed run forms exactly the batches the uninterrupted run would have. (With a wall-clock TTL
the saved times are meaningless after a restart: requests are re-queued as new.)

The state is plain Python (ints, strings, lists, dicts) plus the runners' context states, so
``torch.save`` can store it.

``state_dict(samples=True, source_state=loader.state_dict)`` instead stores the in-flight samples
themselves, plus ``read_ahead``: the samples the read-ahead thread had pulled from the source but
the dispatcher had not taken yet, and ``source_state``: the source's own state taken at that very
instant (the read-ahead is held between two samples meanwhile). To resume: restore the loader
from ``state["source_state"]``, ``load_state_dict(state)``, ``run(loader)``: the in-flight
examples are rebuilt from their saved samples, the read-ahead samples come first, then the
loader continues; no replay. It costs the in-flight samples' size in the checkpoint.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .dispatch_buckets import Example
from .dispatch_metrics import ModeStats

if TYPE_CHECKING:
    from .dispatch import Dispatcher

VERSION = 1
_CONFIG_KEYS = ("max_in_flight", "budget", "mode_budget", "max_batch_samples",
                "mode_max_samples", "ttl_steps", "ttl_seconds", "max_blocks")


# keys of the fingerprint left out while at their unset value (so that states saved before the
# setting existed still load), with that value
FINGERPRINT_UNSET: dict[str, Any] = {"coalesce_tokens": None, "mode_coalesce_tokens": {},
                                     "mode_stall_weight": {}}


def config_fingerprint(d: Dispatcher) -> dict[str, Any]:
    """The settings of ``d``'s config that form its batches (saved with its state: a state
    resumes only under the same); keys at their :data:`FINGERPRINT_UNSET` value are left out."""
    fp = {k: getattr(d.config, k) for k in _CONFIG_KEYS}
    for k, unset in FINGERPRINT_UNSET.items():
        if getattr(d.config, k) != unset:
            fp[k] = getattr(d.config, k)
    return fp


def save_state(d: Dispatcher, samples: bool = False,
               source_state: Callable[[], Any] | None = None) -> dict[str, Any]:
    pending = sorted((r for b in d._nonempty for r in b.q), key=lambda r: r.seq)
    if len(pending) != len(d._in_flight) or d._finished:
        raise RuntimeError("Dispatcher.state_dict() must be called between steps "
                           "(after run() yields a step)")
    if source_state is not None and not samples:
        raise ValueError("source_state needs samples=True (a replayed source has no state)")
    in_flight = []
    for r in pending:
        ex = r._ex
        e = {
            "example": ex.eid, "key": ex.key, "next": ex.next, "state": ex.state,
            "t": r.t, "seq": r.seq,
            "extra": [[p[0], p[1], p[2], list(p[3])] for p in ex.pieces[ex.nsrc:]],
            "outputs": list(ex.outputs), "generated": list(ex.generated),
        }
        if samples:
            e["sample"] = ex.sample
        in_flight.append(e)
    extra: dict[str, Any] = {}
    if samples:
        pf = d._prefetcher
        if pf is not None:
            read_ahead, src = pf.snapshot(source_state)
        else:
            read_ahead, src = [], None if source_state is None else source_state()
        extra = {"read_ahead": read_ahead, "source_state": src}
    return {
        **extra,
        "version": VERSION,
        "config": config_fingerprint(d),
        "clock": d.clock,
        "seq": d._seq,
        "drawn": d.drawn,
        "in_flight": in_flight,
        "counts": dict(d.counts),
        "steps_by_mode": dict(d.steps_by_mode),
        "empty_steps": d.empty_steps,
        "in_flight_sum": d._in_flight_sum,
        "stats": {m: s.state() for m, s in d._stats.items()},
    }


def resume_plan(d: Dispatcher, rs: dict[str, Any], source: Iterable[Any],
                offset: int) -> tuple[Iterable[Any], int, Callable[[int], bool] | None,
                                      Iterator | None]:
    """How ``run`` reads a resumed source: (source, offset, wanted positions, items of the
    in-flight examples when the state carries their samples, else ``None``: read from source)."""
    if "read_ahead" in rs:  # the state carries its samples: no replay
        items = iter([(e["example"], e["sample"], d._prepare(e["sample"]))
                      for e in sorted(rs["in_flight"], key=lambda e: e["example"])])
        return itertools.chain([s for _, s in rs["read_ahead"]], source), rs["drawn"], None, items
    keep = {e["example"] for e in rs["in_flight"]}
    if keep and offset > min(keep):
        raise ValueError(f"resuming needs the source from position {min(keep)}, "
                         f"got offset {offset}")
    return source, offset, lambda p: p >= rs["drawn"] or p in keep, None


def restore_examples(d: Dispatcher, rs: dict[str, Any], it: Iterator) -> None:
    """Rebuild ``d`` from state ``rs``, reading the in-flight samples from ``it``."""
    if rs.get("version") != VERSION:
        raise ValueError(f"dispatcher state version {rs.get('version')!r}, expected {VERSION}")
    if rs["config"] != config_fingerprint(d):
        raise ValueError(f"dispatcher state was saved with config {rs['config']}, "
                         f"this dispatcher has {config_fingerprint(d)}")
    need = {e["example"]: e for e in rs["in_flight"]}
    got: dict[int, tuple[Any, Any]] = {}
    while len(got) < len(need):
        item = next(it, None)
        pos = None if item is None else item[0]
        if pos is None or pos >= rs["drawn"]:
            missing = sorted(set(need) - set(got))
            raise ValueError(f"resuming: the source does not replay in-flight examples at "
                             f"positions {missing[:10]} (keys "
                             f"{[need[p]['key'] for p in missing[:10]]})")
        sample, pieces = item[1], item[2]
        if pos in need:
            if sample.key != need[pos]["key"]:
                raise ValueError(f"resuming: source position {pos} holds sample "
                                 f"{sample.key!r}, the state expects {need[pos]['key']!r}")
            got[pos] = (sample, pieces)
    d.clock, d._seq, d.drawn = rs["clock"], rs["seq"], rs["drawn"]
    d.counts = Counter(rs["counts"])
    d.steps_by_mode = Counter(rs["steps_by_mode"])
    d.empty_steps, d._in_flight_sum = rs["empty_steps"], rs["in_flight_sum"]
    for m, st in rs["stats"].items():
        if m in d._stats:
            d._stats[m] = ModeStats.from_state(st)
    for e in sorted(rs["in_flight"], key=lambda e: e["seq"]):
        sample, pieces = got[e["example"]]
        if isinstance(pieces, Exception):
            raise pieces
        ex = Example(e["example"], e["key"])
        ex.pieces = list(pieces)
        ex.nsrc = len(pieces)
        ex.pieces += [(b, part, mode, tuple(shape), None, None)
                      for b, part, mode, shape in e["extra"]]
        ex.next, ex.state = e["next"], e["state"]
        ex.outputs, ex.generated = list(e["outputs"]), list(e["generated"])  # fresh lists
        d._in_flight[ex.eid] = ex
        d._issue(ex, d._now() if d._wall else e["t"], seq=e["seq"])
