"""Admission from examples built ahead (``dispatch_admit.admission_builder`` / ``admit_from``),
in the run's thread as each chunk comes (``DispatchConfig.admission="inline"``) or in the prefetch
thread (``"prefetch"``): over chained epochs with bad samples in the stream, every batch (each
request's key, shape, time and sequence number), finished example, error, metric and resumed run
is that of one-by-one admission (``"one_by_one"``, the path before)."""

from __future__ import annotations

import gc
import random
import threading

import pytest

from blocklm.formats import Block
from blocklm.pipeline import dispatch_admit
from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_prefetch import _safe
from blocklm.pipeline.dispatch_split import split_first_axis
from blocklm.pipeline.dispatch_types import DispatchConfig, Result
from blocklm.tools.train.chain import EpochChain

from .test_dispatch import length_cost, prep, random_samples, sample, text

SPEC = BucketSpec.explicit({"text": [[8, 16, 32, 64]], "image": [[4, 6, 8], [4, 6, 8], [1]]})
BAD = {  # what each kind of bad sample looks like, and how it is reported
    "prepare": (lambda: [text(3, "bad")], "PrepareError"),
    "oversize": (lambda: [Block("image", (8, 8, 1), "raw", b"")], "OversizeBlockError"),
    "late_oversize": (lambda: [text(4), Block("image", (8, 8, 1), "raw", b"")],
                      "OversizeBlockError"),  # its first block runs, the second is rejected
    "unknown": (lambda: [Block("video", (2,), "raw", b"")], "UnknownModeError"),
    "empty": (lambda: [], None),  # finished at once
}


def bad_prep(block):
    if block.payload == b"bad":
        raise ValueError("cannot decode")
    return prep(block)


class Epochs:
    """A loader stand-in: 40 samples an epoch (one of each bad kind among them), reshuffled."""

    def __init__(self) -> None:
        good = random_samples(35, seed=11)
        bad = [sample(f"bad-{k}", *make()) for k, (make, _) in BAD.items()]
        self.samples, self.epoch = good + bad, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = list(self.samples)
        random.Random(self.epoch).shuffle(order)
        return iter(order)


def _dispatcher(log: list, mode: str, prefetch: int, chunk: int) -> Dispatcher:
    def run(batch):
        log.append((batch.step, batch.mode, batch.bucket, batch.reason, batch.padded_shape,
                    batch.padded_cost, [(r.example, r.key, r.block, r.part, r.shape, r.context,
                                         r.cost, r.t, r.seq, r.last) for r in batch.requests]))
        return [Result(state=(r.key, r.block, r.part)) for r in batch.requests]

    d = Dispatcher({"text": run, "image": run}, SPEC,
                   DispatchConfig(max_in_flight=24, budget=48, ttl_steps=6, prefetch=prefetch,
                                  prefetch_chunk=chunk, admission=mode),
                   cost=length_cost, prepare=bad_prep, splitters={"text": split_first_axis})
    return d


def _chained(mode: str, prefetch: int, chunk: int = 4, *, stop: int | None = None,
             state: dict | None = None):
    """Batches, finished examples and metrics over 4 chained epochs (from ``state``, a saved
    dispatcher and chain state; to step ``stop``, then its state)."""
    log: list = []
    d = _dispatcher(log, mode, prefetch, chunk)
    first, start, expect = 0, 0, {}
    if state is not None:
        d.load_state_dict(state["dispatcher"])
        first, start, expect = EpochChain.resume_args(state["chain"], 0)
    chain = EpochChain(Epochs(), first, start, expect=expect, epochs=4 - first)
    finished, saved = [], None
    for st in d.run(chain, offset=start):
        finished += [(f.example, f.key, f.state, type(f.error).__name__) for f in st.finished]
        if stop is not None and st.batch is not None and st.batch.step == stop:
            s = d.state_dict()
            saved = {"dispatcher": s, "chain": chain.state(Dispatcher.resume_position(s),
                                                           s["drawn"])}
            break
    return log, finished, d.metrics(), dict(d.counts), d.drawn, saved


@pytest.mark.parametrize("prefetch,chunk", [(0, 4), (16, 4), (64, 32)])
def test_chained_epochs_with_bad_samples_form_the_batches_of_one_by_one_admission(prefetch,
                                                                                  chunk):
    old = _chained("one_by_one", prefetch, chunk)
    assert _chained("inline", prefetch, chunk) == old
    assert _chained("prefetch", prefetch, chunk) == old
    log, finished, metrics = old[:3]
    assert len(log) > 30 and len({b[3] for b in log}) >= 2
    assert len({r[1] for b in log for r in b[6]}) > 30  # keys of several epochs ran
    assert metrics["rejected"] == {"PrepareError": 4, "OversizeBlockError": 8,
                                   "UnknownModeError": 4}
    assert sorted(f[3] for f in finished if f[1] == "bad-empty") == ["NoneType"] * 4
    assert len(finished) == 160 and old[4] == 160


@pytest.mark.parametrize("prefetch", [0, 16])
def test_a_run_resumed_mid_chain_forms_the_batches_of_the_uninterrupted_one(prefetch):
    """Stopped at step 29 or 100 (examples of two epochs in flight) and resumed from the saved
    state (the chain rebuilt from its oldest epoch, positions before ``drawn`` skipped), with
    either admission on either side: the uninterrupted one-by-one run's batches."""
    full = _chained("one_by_one", prefetch)[0]
    for stop, before, after in ((29, "inline", "inline"), (100, "prefetch", "prefetch"),
                                (100, "one_by_one", "inline"), (100, "prefetch", "one_by_one"),
                                (29, "inline", "prefetch")):
        head = _chained(before, prefetch, stop=stop)
        saved = head[5]
        assert saved["chain"] == ([[0, 0], [1, 40]] if stop == 29 else [[1, 40], [2, 80]])
        tail = _chained(after, prefetch, state=saved)[0]
        assert head[0] + tail == full


class Counted:
    """A source whose state is the number of samples pulled from it (``source_state``)."""

    def __init__(self, samples: list) -> None:
        self.samples, self.n = samples, 0

    def __iter__(self):
        while self.n < len(self.samples):
            self.n += 1
            yield self.samples[self.n - 1]


@pytest.mark.parametrize("mode", ["inline", "prefetch"])
def test_a_state_with_samples_keeps_the_read_ahead_a_chunk_has_not_admitted(mode):
    """``state_dict(samples=True)``: samples handed over in a chunk but not admitted yet (the
    admitting thread takes a chunk's items in runs) are still the read-ahead's, so the resumed
    run (loader restored, no replay) forms the same batches."""
    samples = list(Epochs()) + random_samples(60, seed=3)
    log: list = []
    d = _dispatcher(log, mode, 64, 32)
    for _ in d.run(samples):
        pass
    full = log[:]
    for stop in (3, 10, 17):
        log.clear()
        d = _dispatcher(log, mode, 64, 32)
        src = Counted(samples)
        for st in d.run(src):
            if st.batch is not None and st.batch.step == stop:
                state = d.state_dict(samples=True, source_state=lambda src=src: src.n)
                break
        assert state["read_ahead"] and state["read_ahead"][0][0] == state["drawn"]
        head = log[:]
        log.clear()
        d = _dispatcher(log, mode, 64, 32)
        d.load_state_dict(state)
        rest = Counted(samples)
        rest.n = state["source_state"]
        for _ in d.run(rest):
            pass
        assert head + log == full


def test_examples_are_built_in_the_prefetch_thread_and_bad_ones_admitted_one_by_one(
        monkeypatch):
    """The work moved: every clean sample's example and first request are built in the
    dispatcher's prefetch thread; the run's thread takes new_example only for the samples bad
    at admission (``late_oversize`` is admitted built: its first block is fine, its second one
    is rejected when issued)."""
    built, slow = [], []
    builder, new_example = dispatch_admit.admission_builder, dispatch_admit.new_example

    def on_builder(d):
        fns = builder(d)
        build = fns["build"]

        def on_build(item):
            got = build(item)
            built.append((threading.current_thread().name, item[1].key, got is not None))
            return got
        return {**fns, "build": on_build}

    def on_new(d, pos, s, pieces):
        slow.append((threading.current_thread().name, s.key))
        return new_example(d, pos, s, pieces)
    monkeypatch.setattr("blocklm.pipeline.dispatch.admission_builder", on_builder)
    monkeypatch.setattr(dispatch_admit, "new_example", on_new)
    _chained("prefetch", 16)
    assert len(built) == 160 and {t for t, _, _ in built} == {"dispatch-prefetch"}
    bad = sorted(f"bad-{k}" for k in BAD if k != "late_oversize")
    assert sorted({k for _, k, ok in built if not ok}) == bad
    main = threading.current_thread().name
    assert sorted(slow) == sorted((main, k) for k in bad for _ in range(4))


class Obj:
    """Something weak-referenceable to watch where it is deallocated."""


def _where_dropped(objs: list, got: list) -> None:
    import weakref

    for o in objs:
        weakref.finalize(o, lambda: got.append(threading.current_thread().name))


@pytest.mark.parametrize("mode", ["inline", "prefetch"])
def test_finished_examples_are_dropped_in_the_prefetch_thread_with_prefetch_admission(mode):
    """A finished example (its sample, pieces, arrays) was deallocated in the run's thread as it
    finished (~2 ms of a small text step); with "prefetch" admission it is buried
    (Prefetcher.bury) and dropped by the prefetch thread before its next read; without that
    thread, or "inline", in the run's thread as before. Every sample is dropped by the run's end
    either way."""
    for prefetch in (0, 16):
        got: list = []

        def source(got=got):  # fresh samples: only the dispatcher refers to them
            for i in range(200):
                s = sample(f"s{i}", *random_samples(1, seed=i)[0].blocks) if i % 50 else (
                    sample(f"bad{i}", text(3, "bad")))
                _where_dropped([s], got)
                yield s
        log: list = []
        d = _dispatcher(log, mode, prefetch, 4)
        for _ in d.run(source()):
            pass
        main = threading.current_thread().name
        del d, log  # its errors' tracebacks hold the reader's frame (and its last sample)
        gc.collect()
        assert len(got) == 200  # none kept
        if prefetch and mode == "prefetch":
            assert got.count("dispatch-prefetch") > 60, got  # 162 here (2 before); the tail
            # (after the last read) and what the worker had no time for: the run's thread
        else:  # (inline: the reader drops none it has handed over: 2 of 200 here)
            assert got.count(main) >= 190, got


def test_what_is_buried_stays_bounded_while_the_worker_cannot_drop_it():
    """The worker drops buried objects only before reading: while its source is blocked, bury
    refuses past MAX_GRAVES (the caller drops them itself), and what it took is dropped by the
    worker once the source moves on."""
    from blocklm.pipeline.dispatch_prefetch import MAX_GRAVES, Prefetcher

    go = threading.Event()

    def source():
        yield 0
        go.wait(10)
        yield from range(1, 5)
    pf = Prefetcher(source(), lambda s: s, depth=4, chunk=1)
    it = iter(pf)
    assert next(it)[0] == 0
    got: list = []
    objs = [Obj() for _ in range(MAX_GRAVES + 1)]
    _where_dropped(objs, got)
    assert [pf.bury([o]) for o in objs] == [True] * MAX_GRAVES + [False]
    del objs
    assert got == [threading.current_thread().name]  # the one refused, dropped by the caller
    go.set()
    assert [x[0] for x in it] == [1, 2, 3, 4]
    pf.close()
    assert got[1:] == ["dispatch-prefetch"] * MAX_GRAVES


class Chunks:
    """A prefetcher stand-in handing over the given chunks, built and sealed as the prefetch
    thread does with "prefetch" admission (its chunk boundaries depend on timing: here they are
    fixed)."""

    def __init__(self, d: Dispatcher, chunks: list) -> None:
        fns = dispatch_admit.admission_builder(d) if d.config.admission == "prefetch" else {}
        self.chunks = []
        for items in chunks:
            built = [fns["build"](x) for x in items] if fns else None
            self.chunks.append((items, built, fns["seal"](built) if fns else None))
        self.chunks.reverse()
        self.taken_n = 0

    def next_chunk(self):
        return self.chunks.pop() if self.chunks else None

    def taken(self, n: int) -> None:
        self.taken_n += n


@pytest.mark.parametrize("room", [64, 7])
def test_a_chunk_admitted_whole_queues_as_request_by_request(room):
    """A chunk admitted whole is appended to its buckets a group at a time: buckets are created
    and become non-empty in the order of their first request (the scan's tie-breaks), with the
    max shapes, costs, fullness, times and sequence numbers of pushes one by one; with room for
    fewer, the chunks are admitted in part, request by request."""
    img = Block("image", (4, 4, 1), "raw", b"")
    samples = [sample("i0", img), sample("t0", text(12)), sample("t1", text(8)),
               sample("t2", text(30)), sample("i1", Block("image", (6, 4, 1), "raw", b"")),
               sample("t3", text(16)), sample("t4", text(60)), sample("t5", text(12)),
               sample("x", text(3, "bad")), sample("t6", text(9))]
    got = []
    for mode in ("prefetch", "inline", "one_by_one"):
        d = _dispatcher([], mode, 0, 4)
        d.config = DispatchConfig(**{**d.config.__dict__, "max_in_flight": room})
        d._seq = 5  # requests issued before
        items = [(p, s, _safe(d._prepare, s)) for p, s in enumerate(samples, 100)]
        build = dispatch_admit.admission_builder(d)["build"] if mode == "inline" else None
        feed = dispatch_admit.Feed(Chunks(d, [items[:6], items[6:]]), build)
        dispatch_admit.admit_from(d, feed)
        got.append(([b for b in d._buckets], [(b.mode, b.key, b.maxshape, b.maxcost, b.full,
                                               [(r.key, r.t, r.seq, r.cost) for r in b.q])
                                              for b in d._nonempty],
                    list(d._in_flight), dict(d.counts), d.drawn, d._seq, feed.pf.taken_n))
    assert got[0] == got[1] == got[2]
    if room == 64:
        assert got[0][0] == [("image", (0, 0, 0)), ("text", (1,)), ("text", (0,)),
                             ("text", (2,)), ("image", (1, 0, 0)), ("text", (3,))]
        assert got[0][3] == {"admitted": 10, "rejected_PrepareError": 1, "finished": 1}
    else:
        assert len(got[0][2]) == 7 and got[0][4] == 107
