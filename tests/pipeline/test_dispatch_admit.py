"""Admission from a plan built ahead (``dispatch_admit``): the same batches, finished examples,
metrics and resumable state as admitting the same samples one by one."""

from __future__ import annotations

import threading

import pytest

from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_admit import Admission, plan_admission
from blocklm.pipeline.dispatch_split import split_first_axis
from blocklm.pipeline.dispatch_types import DispatchConfig, Result

from .test_dispatch import Block, length_cost, prep, random_samples, sample, text

SPEC = BucketSpec.explicit({"text": [[8, 16, 32, 64]], "image": [[4, 6, 8], [4, 6, 8], [1]]})


def _make(log: list, **cfg) -> Dispatcher:
    def run(batch):
        log.append((batch.step, batch.mode, batch.bucket, batch.reason, batch.padded_shape,
                    batch.padded_cost, batch.cost,
                    [(r.example, r.key, r.block, r.part, r.mode, r.shape, r.context, r.inputs,
                      r.targets, r.cost, r.t, r.seq, r.last) for r in batch.requests]))
        return [Result(state=(r.key, r.block, r.part)) for r in batch.requests]

    cfg = {"max_in_flight": 64, "budget": 48, "ttl_steps": 6, "prefetch": 0, **cfg}
    return Dispatcher({"text": run, "image": run}, SPEC, DispatchConfig(**cfg),
                      cost=length_cost, prepare=prep, splitters={"text": split_first_axis})


def _plan(d: Dispatcher, samples, offset: int = 0) -> Admission:
    """As the trainer's read-ahead does: prepared in another thread, then planned there."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(plan_admission(
        d, samples, [d._prepare(s) for s in samples], offset)))
    t.start()
    t.join()
    assert isinstance(out[0], Admission)
    return out[0]


def _epochs(epochs: list, planned: bool, *, state_at: int | None = None, **cfg):
    """Every batch, finished example, metric and one mid-run state over ``epochs`` (lists of
    samples, one run each, as the trainer runs epochs)."""
    log: list = []
    d = _make(log, **cfg)
    finished, state = [], None
    for samples in epochs:
        for st in d.run(_plan(d, samples) if planned else samples):
            finished += [(f.example, f.key, f.state, f.error) for f in st.finished]
            if st.batch is not None and st.batch.step == state_at:
                state = d.state_dict()
    return log, finished, d.metrics(), state, d.counts, d.drawn


def _two_epochs(n: int, seed: int) -> list:
    return [random_samples(n, seed=seed), random_samples(n, seed=seed + 1)]


@pytest.mark.parametrize("n,k", [(60, 64), (64, 64), (9, 64)])
def test_planned_epochs_form_the_batches_of_one_by_one_admission(n, k):
    """Two epochs (a run each): every batch field (reasons, padded shapes, each request's time
    and sequence number), every finished example and the metrics are those of one-by-one
    admission; also with an epoch of exactly ``max_in_flight`` (drain vs stall timing)."""
    epochs = _two_epochs(n, seed=n)
    old = _epochs(epochs, planned=False, state_at=5, max_in_flight=k)
    new = _epochs(epochs, planned=True, state_at=5, max_in_flight=k)
    assert new == old
    log = old[0]
    assert len(log) > 10 and len({b[3] for b in log}) >= 2  # several reasons ran
    assert len({b[2] for b in log}) >= 4 and max(len(b[7]) for b in log) > 1


def test_split_blocks_and_a_cap_are_planned_alike():
    """Blocks over the budget (split in the read-ahead) and a per-batch cap."""
    epochs = [[sample(f"a{i}", text(5 + 13 * i % 90), text(3)) for i in range(30)],
              [sample(f"b{i}", Block("image", (4 + i % 5, 6, 1), "raw", b""), text(70 + i))
               for i in range(30)]]
    old = _epochs(epochs, planned=False, max_batch_samples=3)
    assert any(r[3] > 0 for b in old[0] for r in b[7])  # parts of split blocks ran
    assert _epochs(epochs, planned=True, max_batch_samples=3) == old


def test_a_plan_joins_examples_already_in_flight():
    """A run that follows an abandoned one: buckets already hold requests (the plan's groups
    extend them, their max shapes grow) and the sequence numbers continue."""
    first, rest = random_samples(20, seed=5), random_samples(25, seed=6)
    got = []
    for planned in (False, True):
        log: list = []
        d = _make(log)
        for st in d.run(first):
            if st.index == 2:
                break  # 20 admitted, a few finished: the rest stays in flight
        assert d.in_flight > 10
        src = _plan(d, rest, offset=d.drawn) if planned else rest
        finished = [(f.example, f.key, f.state) for st in d.run(src, offset=d.drawn)
                    for f in st.finished]
        got.append((log, finished, d.metrics(), d.drawn))
    assert got[0] == got[1] and got[1][3] == 45


def test_a_plan_that_cannot_be_admitted_at_once_is_read_as_its_samples():
    """More samples than free places in flight, or another offset: admitted one by one (the
    samples prepared again), the same batches."""
    samples = random_samples(40, seed=8)
    old = _epochs([samples], planned=False, max_in_flight=16)
    assert _epochs([samples], planned=True, max_in_flight=16) == old
    log: list = []
    d = _make(log)
    plan = _plan(d, samples)
    assert len(list(d.run(plan, offset=3))) > 0 and d.drawn == 43  # positions from 3
    with pytest.raises(ValueError, match="admitted once"):
        iter(plan)


def test_a_plan_is_admitted_once():
    log: list = []
    d = _make(log)
    plan = _plan(d, random_samples(10, seed=1))
    assert sum(len(st.finished) for st in d.run(plan)) == 10
    with pytest.raises(ValueError, match="admitted once"):
        list(d.run(plan))


def test_no_plan_for_sources_with_rejections_or_initial_state():
    """Bad data (a failed prepare, a block over the budget without a splitter, a mode without a
    runner) and ``init_state`` are left to one-by-one admission, which counts and reports them."""
    log: list = []
    d = _make(log)
    good = random_samples(5, seed=2)
    pieces = [d._prepare(s) for s in good]
    assert plan_admission(d, good, pieces) is not None
    assert plan_admission(d, good, pieces[:4] + [None]) is None  # its prepare failed
    assert plan_admission(d, good, pieces[:4] + [[]]) is None  # no blocks
    audio = sample("a", Block("audio", (3,), "raw", b""))
    assert plan_admission(d, [audio], [d._prepare(audio)]) is None
    big = sample("big", Block("image", (8, 8, 1), "raw", b""))  # 64 > 48, no image splitter
    assert plan_admission(d, [big], [d._prepare(big)]) is None
    d._init_state = lambda s: s.key
    assert plan_admission(d, good, pieces) is None


def test_buckets_enter_the_scan_in_the_order_of_their_first_request():
    """Partial buckets of equal pending cost run in the order they became non-empty (the scan's
    tie-break): the plan's groups keep the order of each bucket's first request."""
    img = Block("image", (4, 4, 1), "raw", b"")  # 16 tokens, as text(16) and two text(8)
    epochs = [[sample("i0", img), sample("t0", text(16)), sample("t1", text(8)),
               sample("t2", text(8))], [sample("t3", text(8)), sample("t4", text(16)),
                                        sample("i1", img), sample("t5", text(8))]]
    old = _epochs(epochs, planned=False)
    assert [[r[1] for r in b[7]] for b in old[0]] == [
        ["i0"], ["t0"], ["t1", "t2"], ["t3", "t5"], ["t4"], ["i1"]]
    assert _epochs(epochs, planned=True) == old
