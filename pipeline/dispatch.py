"""The central dispatcher: examples in flight, per-mode shape-bucketed queues, token budgets, TTL.

Usage (training)::

    spec = buckets_from_index("data/shards/mixed")          # or BucketSpec.explicit(...)
    d = Dispatcher({"text": text_runner, "image": image_runner}, spec, DispatchConfig(budget=8192))
    for step in d.run(BlockDataset(...)):                    # any iterable of Samples
        if (step.index + 1) % accum == 0:
            optimizer.step(); optimizer.zero_grad()
    log(d.metrics())

How it works. Up to ``max_in_flight`` examples are in flight; each has exactly one pending
:class:`Request` (its next block) in the queue of its mode and shape bucket. Every step:

1. admit examples from the (prefetched) source until ``max_in_flight`` are in flight;
2. pick one bucket: the one whose oldest request outlived the TTL (oldest first), else a full one
   (the next request would break the budget or the sample cap; oldest first), else, when no more
   examples can be admitted (stall) or the source is exhausted (drain), the bucket with the most
   pending padded cost; with several ranks, all agree on the mode first (:mod:`.dispatch_dist`);
3. take the longest FIFO prefix of that bucket whose padded cost fits the budget (a batch not
   full may take whole buckets of its mode along: :mod:`.dispatch_coalesce`), call the mode's
   runner, advance the clock by one, and hand each result to its example, which issues its next
   block (its own next block, else ``Result.next`` when generating) or finishes.

No randomness is involved and the prefetch thread preserves order, so the same source, config and
buckets give the same batches in the same order (not with a wall-clock TTL).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from .buckets import BucketSpec
from .cost import CostFn, ModeCost, default_cost
from .dispatch_admit import Feed, admission_builder, admit_from, admit_planned, usable
from .dispatch_buckets import Bucket, Example, Piece
from .dispatch_coalesce import coalesce_into
from .dispatch_dist import IDLE, Agree, choose
from .dispatch_metrics import ModeStats, dispatcher_report
from .dispatch_prefetch import Prefetcher
from .dispatch_resume import restore_examples, resume_plan, save_state
from .dispatch_split import Splitter, prepare_pieces
from .dispatch_types import (
    ADMISSIONS,
    Batch,
    DispatchConfig,
    DispatchError,
    Finished,
    OversizeBlockError,
    Request,
    Result,
    Runner,
    Step,
    UnknownModeError,
)

MAX_KEPT_ERRORS = 100


class Dispatcher:
    """Central dispatcher (module docstring). ``runners`` maps every mode to its runner
    (:data:`Runner`); ``buckets`` gives shape buckets (modes not listed: one FIFO bucket);
    ``cost(mode, shape)`` the tokens a block costs; ``agree`` the all-gather of
    :mod:`.dispatch_dist` when several ranks run in step (``None``: a single rank);
    ``prepare(block) -> (inputs, targets[, measured shape])`` replaces ``block.decode()``;
    ``splitters[mode]`` splits blocks over the budget instead of rejecting them (both:
    :mod:`.dispatch_split`); ``init_state(sample)`` gives an example's initial context.
    ``config.admission`` says where examples are built (same batches; :mod:`.dispatch_admit`)."""

    def __init__(self, runners: Mapping[str, Runner], buckets: BucketSpec | None = None,
                 config: DispatchConfig | None = None, *, cost: CostFn = default_cost,
                 agree: Agree | None = None, rank: int = 0,
                 prepare: Callable[[Any], tuple] | None = None,
                 splitters: Mapping[str, Splitter] | None = None,
                 init_state: Callable[[Any], Any] | None = None) -> None:
        if not runners:
            raise ValueError("a dispatcher needs at least one runner")
        self.runners = dict(runners)
        self.modes = sorted(self.runners)
        self.config = cfg = config or DispatchConfig()
        if cfg.admission not in ADMISSIONS:  # a config changed after construction
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {cfg.admission!r}")
        spec = buckets or BucketSpec({})
        missing = sorted(set(spec.modes) - set(self.runners))
        if missing:
            raise UnknownModeError(
                f"the data has modes {missing} (bucket spec) without a runner; "
                f"runners are given for {self.modes}")
        self.rank = rank
        self._agree = agree
        self._prepare_fn = prepare
        self._splitters = dict(splitters or {})
        self._init_state = init_state
        self._mode_index = {m: i for i, m in enumerate(self.modes)}
        self._mc = {m: ModeCost(m, cost) for m in self.modes}
        self._spec = {m: spec.of(m) for m in self.modes}
        self._budget = {m: cfg.budget_of(m) for m in self.modes}
        self._buckets: dict[tuple, Bucket] = {}
        self._nonempty: dict[Bucket, None] = {}  # insertion-ordered set: deterministic scans
        self._shape_cache: dict[str, dict[tuple, tuple[Bucket, int]]] = {m: {} for m in self.modes}
        self._wall = cfg.ttl_seconds is not None
        self._ttl = cfg.ttl_seconds if self._wall else cfg.ttl_steps
        self._age_unit = 1000.0 if self._wall else 1.0  # ages kept as integer ms or steps
        self.clock = 0  # dispatcher steps run so far: the logical clock
        self._seq = 0
        self.drawn = 0  # next source position
        self._exhausted = False
        self._in_flight: dict[int, Example] = {}
        self._dead: list[Example] = []  # finished since the last step
        self._finished: list[Finished] = []
        self._stats = {m: ModeStats() for m in self.modes}
        self.counts: Counter[str] = Counter()  # admitted, finished, rejected_*, truncated
        self.steps_by_mode: Counter[str] = Counter()
        self.empty_steps = 0
        self._in_flight_sum = 0
        self.errors: list[DispatchError] = []  # the first MAX_KEPT_ERRORS rejections
        self._restore: dict | None = None
        self._prefetcher: Prefetcher | None = None  # of the run in progress
        # The most padded tokens the next batch may cost (None: the mode's budget), set by the
        # consumer between steps: the trainer's room left in its optimizer step's window, whose
        # activations are all alive until its backward (tools/train/loop.py, train.window_max)
        self.batch_limit: int | None = None
        # per-mode overrides of batch_limit, set the same way (train.window_mode_max)
        self.mode_batch_limit: dict[str, int] = {}

    # -- requests ------------------------------------------------------------------------------
    def limit_of(self, mode: str) -> int | None:
        """The most padded tokens ``mode``'s next batch may cost (None: its budget):
        :attr:`mode_batch_limit`'s entry for the mode, else :attr:`batch_limit`."""
        return self.mode_batch_limit.get(mode, self.batch_limit)

    def _now(self) -> float:
        return time.monotonic() if self._wall else self.clock

    def _issue(self, ex: Example, t: float, seq: int | None = None) -> None:
        block, part, mode, shape, inputs, targets = ex.pieces[ex.next]
        cache = self._shape_cache.get(mode)
        if cache is None:
            return self._reject(ex, UnknownModeError(
                f"no runner for this mode (runners: {self.modes})", key=ex.key, block=block,
                mode=mode))
        hit = cache.get(shape)
        if hit is None:
            c = self._mc[mode](shape)
            if c > self._budget[mode]:
                return self._reject(ex, OversizeBlockError(
                    f"shape {list(shape)} costs {c} tokens, more than the whole batch budget "
                    f"{self._budget[mode]}, and mode {mode!r} has no splitter", key=ex.key,
                    block=block, mode=mode))
            hit = (self._bucket((mode, self._spec[mode].key(shape))), c)
            if len(cache) < 1 << 16:
                cache[shape] = hit
        b, c = hit
        if seq is None:
            seq = self._seq
            self._seq += 1
        r = Request(ex.eid, ex.key, block, part, mode, shape, ex.state, inputs, targets, c, t,
                    seq, ex)
        if b.push(r):
            self._nonempty[b] = None

    def _reject(self, ex: Example, err: DispatchError) -> None:
        self.counts["rejected_" + type(err).__name__] += 1
        if len(self.errors) < MAX_KEPT_ERRORS:
            self.errors.append(err)
        if isinstance(err, OversizeBlockError) and self.config.on_oversize == "raise":
            raise err
        self._finish(ex, err)

    def _finish(self, ex: Example, err: Exception | None = None) -> None:
        del self._in_flight[ex.eid]
        self.counts["finished"] += 1
        self._finished.append(Finished(ex.eid, ex.key, ex.state, ex.outputs or [],
                                       ex.generated or [], err))
        ex.state = None  # the Finished record hands it on; the example is dropped later,
        self._dead.append(ex)  # by the prefetch thread when it can (_step, Prefetcher.bury)

    # -- admission ----------------------------------------------------------------------------
    def _prepare(self, sample: Any) -> list[Piece]:
        """Runs in the prefetch thread: decode (or ``prepare``) and split every block."""
        return prepare_pieces(sample, self.config.decode, self._prepare_fn, self._splitters,
                              self._mc, self._budget)

    def _admit(self, feed: Feed) -> None:
        if len(self._in_flight) < self.config.max_in_flight and not self._exhausted:
            admit_from(self, feed)  # examples built a chunk at a time (dispatch_admit.py)

    def _bucket(self, bkey: tuple) -> Bucket:
        """The bucket ``(mode, key)``, created on first use."""
        b = self._buckets.get(bkey)
        if b is None:
            mode = bkey[0]
            b = self._buckets[bkey] = Bucket(mode, bkey[1], self._mc[mode], self._budget[mode],
                                             self.config.cap_of(mode))
        return b

    # -- scheduling ---------------------------------------------------------------------------
    def _scan(self, mode: str | None) -> tuple[int, Bucket | None]:
        """Most urgent bucket (of ``mode``, or any): (2, expired) > (1, full) > (0, partial)."""
        now, ttl = self._now(), self._ttl
        exp = full = None
        for b in self._nonempty:
            if mode is not None and b.mode != mode:
                continue
            h = b.q[0]
            if now - h.t >= ttl:
                if exp is None or h.seq < exp.q[0].seq:
                    exp = b
            elif b.full and (full is None or h.seq < full.q[0].seq):
                full = b
        if exp is not None:
            return 2, exp
        if full is not None:
            return 1, full
        best, best_c = None, -1.0
        weight = self.config.stall_weight_of
        for b in self._nonempty:
            if mode is None or b.mode == mode:
                c = b.pending_cost() * weight(b.mode)
                if c > best_c:
                    best, best_c = b, c
        return 0, best

    def _choose(self) -> tuple[str, Bucket | None, int] | None:
        """(mode, bucket or None for an empty batch, urgency), or None when all ranks are done."""
        u, b = self._scan(None)
        active = bool(self._in_flight) or not self._exhausted
        if self._agree is None:
            return (b.mode, b, u) if b is not None else None
        if b is not None:
            age = int((self._now() - b.q[0].t) * self._age_unit)
            prop = (1, u, age, self._mode_index[b.mode])
        else:
            prop = (1, 0, 0, 0) if active else IDLE
        props = self._agree(prop)
        w = choose(props)
        if w is None:
            return None
        mode = self.modes[props[w][3]]
        if b is not None and b.mode == mode:
            return mode, b, u
        u2, b2 = self._scan(mode)
        if b2 is not None and (u2 > 0 or u == 0):  # due, or this rank is stalled anyway
            return mode, b2, u2
        return mode, None, -1

    def _step(self) -> Step | None:
        got = self._choose()
        if got is None:
            return None
        mode, b, u = got
        now = self._now()
        stats = self._stats[mode]
        if b is None:
            batch = Batch(self.clock, mode, None, [], None, 0, 0, "empty")
            self.empty_steps += 1
        else:
            reason = ("full" if b.full else "ttl" if u == 2 else
                      "drain" if self._exhausted else "stall")
            reqs, pshape, pcost, cost = b.take(self.limit_of(mode))
            if not b.q:
                del self._nonempty[b]
            pshape, pcost, cost = coalesce_into(self, b, reason, reqs, pshape, pcost, cost)
            batch = Batch(self.clock, mode, b.key, reqs, pshape, pcost, cost, reason)
            ages, unit = stats.ages, self._age_unit
            for r in reqs:
                ages[int((now - r.t) * unit)] += 1
        stats.add(len(batch.requests), batch.padded_cost, batch.cost, self._budget[mode],
                  batch.reason)
        self.steps_by_mode[mode] += 1
        self._in_flight_sum += len(self._in_flight)
        results = self.runners[mode](batch)
        if len(results) != len(batch.requests):
            raise DispatchError(f"runner returned {len(results)} results for a batch of "
                                f"{len(batch.requests)} at step {self.clock}", mode=mode)
        self.clock += 1
        self._route(batch.requests, results)
        finished, self._finished = self._finished, []
        dead, self._dead = self._dead, []
        if dead and self._prefetcher is not None and self.config.admission == "prefetch":
            self._prefetcher.bury(dead)  # else (or bury refused) dropped here, as before
        return Step(batch.step, batch, results, finished)

    def _route(self, reqs: list[Request], results) -> None:
        keep, max_blocks = self.config.keep_outputs, self.config.max_blocks
        now, issue = self._now(), self._issue
        for r, res in zip(reqs, results):
            ex = r._ex
            r._ex = None  # a finished batch does not keep examples alive
            ex.state = res.state
            if keep:
                if not ex.outputs:
                    ex.outputs = []
                ex.outputs.append((r.block, r.part, res.output))
            if res.block is not None:
                if not ex.generated:
                    ex.generated = []
                ex.generated.append((r.mode, r.shape, res.block))
            ex.next += 1
            if ex.next < len(ex.pieces):
                issue(ex, now)
            elif res.next is not None and ex.pieces[-1][0] + 1 < max_blocks:
                mode, shape = res.next
                shape = tuple(shape)
                block = ex.pieces[-1][0] + 1
                if not all(type(v) is int and v >= 0 for v in shape):
                    self._reject(ex, DispatchError(
                        f"the runner asked for a next block of invalid shape {shape!r}",
                        key=ex.key, block=block, mode=mode))
                    continue
                ex.pieces.append((block, 0, mode, shape, None, None))
                issue(ex, now)
            else:
                if res.next is not None:
                    self.counts["truncated"] += 1
                self._finish(ex)

    # -- public -------------------------------------------------------------------------------
    def run(self, source: Iterable[Any], *, offset: int = 0,
            prefetch: int | None = None) -> Iterator[Step]:
        """Dispatch every example of ``source`` (``Sample``-like: ``.key``, ``.blocks`` with
        ``.mode``/``.shape``); yield a :class:`Step` after each runner step. ``offset`` is the
        source position of ``source``'s first item (resuming: see :meth:`load_state_dict`). A
        last ``Step`` with ``batch=None`` may carry examples rejected after the last batch.
        ``prefetch`` replaces ``config.prefetch`` for this run (0 for a source already read and
        prepared in memory: a thread only adds hand-offs; the batches are the same). An
        :class:`~.dispatch_admit.Admission` of this dispatcher is admitted at once."""
        want = None
        rs = self._restore
        if rs is None and self._in_flight and offset < self.drawn:
            raise ValueError(f"{len(self._in_flight)} examples are still in flight from an "
                             f"earlier run: continue with the rest of the source and "
                             f"offset={self.drawn}")
        restore_items: Iterator | None = None
        if rs is not None:
            source, offset, want, restore_items = resume_plan(self, rs, source, offset)
        plan = usable(self, source, offset) if rs is None else None
        fns, build = admission_builder(self), None  # {build, seal} (dispatch_admit.py): built
        if self.config.admission == "inline":  # in this thread as each chunk comes
            fns, build = {}, fns.get("build")
        pf = Prefetcher(() if plan is not None else source, self._prepare,
                        depth=self.config.prefetch if prefetch is None else prefetch,
                        chunk=self.config.prefetch_chunk, offset=offset, want=want,
                        workers=self.config.decode_workers, **fns)
        self._prefetcher = pf
        self._exhausted = False
        try:
            feed = Feed(pf, build)
            if rs is not None:
                restore_examples(self, rs, restore_items or iter(feed))
                self._restore = None
            if plan is not None:
                admit_planned(self, plan)
            while True:
                self._admit(feed)
                step = self._step()
                if step is None:
                    break
                yield step
            if self._finished:
                finished, self._finished = self._finished, []
                yield Step(self.clock, None, [], finished)  # type: ignore[arg-type]
        finally:
            self._prefetcher, self._dead = None, []
            pf.close()

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def metrics(self) -> dict[str, Any]:
        """Metrics as a dict (definitions in :mod:`.dispatch_metrics`)."""
        return dispatcher_report(self)

    def state_dict(self, *, samples: bool = False,
                   source_state: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Everything needed to resume (call between steps); see :mod:`.dispatch_resume`.

        ``samples=True`` also stores the in-flight samples and those the read-ahead pulled from
        the source but the dispatcher has not taken, and ``source_state()`` (e.g. the loader's
        ``state_dict``) called at that same instant: resume then with the source restored to
        that state, no replay needed."""
        return save_state(self, samples, source_state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The next :meth:`run` gets the source restored to
        ``state["source_state"]`` when the state carries samples, else the same source from
        position ``resume_position(state)`` (or earlier, with ``offset`` set accordingly)."""
        self._restore = state

    @staticmethod
    def resume_position(state: dict[str, Any]) -> int:
        """The first source position a resumed :meth:`run` needs."""
        return min([e["example"] for e in state["in_flight"]] + [state["drawn"]])


__all__ = ["Dispatcher", "Result", "Request", "Batch", "Step", "Finished", "DispatchConfig"]
