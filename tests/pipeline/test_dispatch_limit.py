"""``Dispatcher.batch_limit``: the consumer's room for the next batch (the trainer's window cap,
``train.window_max``), honoured by a bucket's take and by coalescing."""

from __future__ import annotations

from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch_buckets import Bucket
from blocklm.pipeline.dispatch_types import Request

from .test_dispatch import make, sample, text

SPEC = BucketSpec.explicit({"text": [[10, 11, 12, 20, 40, 60]]})


def _req(i: int, n: int) -> Request:
    return Request(i, f"e{i}", 0, 0, "text", (n,), None, None, None, n, 0, i, None)


def test_take_stops_at_the_limit_but_takes_one_and_full_keeps_the_budget():
    b = Bucket("text", (0,), lambda s: s[0], budget=80, cap=None)
    for i in range(8):
        b.push(_req(i, 10))
    assert b.full  # 9 x 10 would break the budget (80)
    reqs, shape, padded, total = b.take(35)
    assert [r.key for r in reqs] == ["e0", "e1", "e2"] and padded == 30 and total == 30
    assert b.full is False and len(b.q) == 5  # 6 x 10 fits: not full any more
    reqs, *_ = b.take(5)  # under one request's cost: still one
    assert [r.key for r in reqs] == ["e3"]
    reqs, *_ = b.take(None)
    assert [r.key for r in reqs] == ["e4", "e5", "e6", "e7"]


def test_the_limit_is_read_at_each_batch_and_the_rest_waits():
    samples = [sample(f"e{i}", text(10)) for i in range(6)]
    d, log = make(samples, spec=SPEC, budget=60, max_in_flight=8)
    run = d.run(samples)
    d.batch_limit = 25
    first = next(run)
    d.batch_limit = None
    rest = list(run)
    assert len(first.batch.requests) == 2 and first.batch.padded_cost == 20
    assert [len(s.batch.requests) for s in rest if s.batch] == [4]
    assert sorted(r.key for b in log for r in b.requests) == [s.key for s in samples]


def test_coalescing_stays_within_the_limit():
    samples = [sample(f"e{n}", text(n)) for n in (10, 11, 12)]
    d, log = make(samples, spec=SPEC, budget=1000, max_in_flight=8, coalesce_tokens=1000)
    d.batch_limit = 24  # 12 + 11 padded to 24; all three (36) would break it
    steps = list(d.run(samples))
    assert all(s.batch.padded_cost <= 24 for s in steps if s.batch)
    assert len([s for s in steps if s.batch]) == 2
    d, log = make(samples, spec=SPEC, budget=1000, max_in_flight=8, coalesce_tokens=1000)
    assert len([s for s in d.run(samples) if s.batch]) == 1  # no limit: one batch of 36


def test_a_modes_own_limit_replaces_the_general_one_for_that_mode_only():
    """``mode_batch_limit`` (the trainer's ``train.window_mode_max``): image batches get their
    own room, text batches keep ``batch_limit``."""
    from blocklm.formats import Block

    img = [sample(f"i{k}", Block("image", (2, 5, 1), "raw", b"")) for k in range(6)]
    txt = [sample(f"t{k}", text(10)) for k in range(6)]
    spec = BucketSpec.explicit({"text": [[10, 11, 12, 20, 40, 60]], "image": [[2], [5], [1]]})
    d, log = make(img + txt, spec=spec, budget=60, max_in_flight=12)
    assert d.limit_of("image") is None
    run = d.run(img + txt)
    d.batch_limit, d.mode_batch_limit = 25, {"image": 45}
    assert (d.limit_of("image"), d.limit_of("text")) == (45, 25)
    first, second = next(run), next(run)
    sizes = {s.batch.mode: len(s.batch.requests) for s in (first, second)}
    assert sizes == {"image": 4, "text": 2}  # 4 x 10 <= 45; 2 x 10 <= 25
    d.batch_limit, d.mode_batch_limit = None, {}
    list(run)
    assert sorted(r.key for b in log for r in b.requests) == sorted(s.key for s in img + txt)


def test_coalescing_stays_within_a_modes_own_limit():
    samples = [sample(f"e{n}", text(n)) for n in (10, 11, 12)]
    d, log = make(samples, spec=SPEC, budget=1000, max_in_flight=8, coalesce_tokens=1000)
    d.batch_limit, d.mode_batch_limit = 1000, {"text": 24}
    steps = [s for s in d.run(samples) if s.batch]
    assert all(s.batch.padded_cost <= 24 for s in steps) and len(steps) == 2
