"""Coalescing (``DispatchConfig.coalesce_tokens``): a batch its bucket does not fill takes
neighbouring buckets of its mode along when one batch fewer is worth the padding."""

from __future__ import annotations

import pickle

import pytest

from blocklm.formats import Block
from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_coalesce import _runs
from blocklm.pipeline.dispatch_types import DispatchConfig

from .test_dispatch import make, random_samples, run_all, sample, text

SPEC = BucketSpec.explicit({"text": [[10, 11, 12, 20, 40, 60]]})


def lengths(batch):
    return sorted(r.shape[0] for r in batch.requests)


def test_drain_batches_take_the_neighbouring_buckets_along():
    # three narrow buckets (10, 11, 12) of one text each: one batch of 12 x 3 = 36 tokens with
    # 3 padded tokens, instead of three batches; 40 is far away (3 x 28 = 84 more padding)
    samples = [sample(f"e{n}", text(n)) for n in (10, 11, 12, 40)]
    d, log = make(samples, spec=SPEC, budget=1000, max_in_flight=8, coalesce_tokens=20)
    run_all(d, samples)
    assert [lengths(b) for b in log] == [[40], [10, 11, 12]]
    assert log[1].padded_shape == (12,) and log[1].padded_cost == 36 and log[1].cost == 33
    m = d.metrics()["modes"]["text"]
    assert m["batches"] == 2 and m["pending"] == 0

    plain, plog = make(samples, spec=SPEC, budget=1000, max_in_flight=8)
    run_all(plain, samples)
    assert len(plog) == 4  # what coalescing replaces: one partial batch per bucket


def test_the_price_of_a_batch_decides_how_much_padding_is_taken():
    samples = [sample(f"e{n}", text(n)) for n in (10, 11, 12, 40)]
    for lam, want in [(0, 4), (2, 3), (3, 2), (200, 1)]:  # 10+11 pads 1, +12 pads 3, +40 pads 87
        d, log = make(samples, spec=SPEC, budget=1000, max_in_flight=8, coalesce_tokens=lam)
        run_all(d, samples)
        assert len(log) == want, lam


def test_the_budget_and_the_sample_cap_bound_a_coalesced_batch():
    # whole buckets go along (a bucket's FIFO is never split by coalescing); 12+11 (6 x 12) and
    # 11+10 (6 x 11) both fit 72 with 3 padded tokens: the tie keeps the first run shortest
    samples = [sample(f"e{i}", text(n)) for i, n in enumerate([10] * 3 + [11] * 3 + [12] * 3)]
    d, log = make(samples, spec=SPEC, budget=72, max_in_flight=16, coalesce_tokens=1000)
    run_all(d, samples)
    assert [lengths(b) for b in log] == [[12] * 3, [10] * 3 + [11] * 3]
    d, log = make(samples, spec=SPEC, budget=65, max_in_flight=16, coalesce_tokens=1000)
    run_all(d, samples)
    assert len(log) == 3 and all(b.padded_cost <= 65 for b in log)
    two = samples[1:3] + samples[4:6] + samples[7:]
    d, log = make(two, spec=SPEC, budget=1000, max_in_flight=16, coalesce_tokens=1000,
                  max_batch_samples=4)
    run_all(d, two)
    assert [len(b.requests) for b in log] == [2, 4]


def test_full_batches_are_not_coalesced():
    # bucket 10 fills the budget (2 x 10 = 20, a third would break it): it runs full, alone
    samples = [sample(f"e{i}", text(n)) for i, n in enumerate([10, 10, 11])]
    d, log = make(samples, spec=SPEC, budget=20, max_in_flight=8, coalesce_tokens=1000)
    run_all(d, samples)
    assert log[0].reason == "full" and lengths(log[0]) == [10, 10] and lengths(log[1]) == [11]


def test_transposed_images_need_a_high_price_to_share_a_batch():
    img = [sample(f"i{i}", Block("image", s, "raw", b"")) for i, s in
           enumerate([(4, 8, 1), (8, 4, 1)])]
    spec = BucketSpec.explicit({"image": [[4, 8], [4, 8], [1]]})
    d, log = make(img, spec=spec, budget=1000, max_in_flight=8, coalesce_tokens=31)
    run_all(d, img)
    assert len(log) == 2  # together: 2 x 64 = 128 for 64 tokens: 64 padded tokens > 31
    d, log = make(img, spec=spec, budget=1000, max_in_flight=8, coalesce_tokens=65)
    run_all(d, img)
    assert len(log) == 1 and log[0].padded_shape == (8, 8, 1)


def test_runs_are_the_optimum_of_padding_plus_price():
    units = [(1, 10, (10,)), (1, 9, (9,)), (1, 5, (5,)), (1, 4, (4,))]  # longest first
    cost = lambda s: s[0]  # noqa: E731
    assert _runs(units, cost, 1000, None, 0) == [1, 2, 3, 4]
    assert _runs(units, cost, 1000, None, 2) == [2, 4]  # pads 1 + 1 for one batch fewer each
    assert _runs(units, cost, 1000, None, 100) == [4]
    assert _runs(units, cost, 20, None, 100) == [2, 4]  # 3 x 10 > 20


def test_coalescing_is_deterministic_and_keeps_every_request_once():
    data = random_samples(300, seed=3)
    spec = BucketSpec.explicit({"text": [[8, 16, 24, 32, 40, 48, 60]],
                                "image": [[4, 5, 6, 8], [3, 4, 6, 8], [1]]})
    runs = []
    for _ in range(2):
        d, log = make(data, spec=spec, budget=200, max_in_flight=40, ttl_steps=6,
                      coalesce_tokens=40, prefetch=16)
        _, finished = run_all(d, data)
        assert len(finished) == len(data) and all(f.error is None for f in finished)
        assert all(b.padded_cost <= 200 for b in log)
        runs.append([(b.mode, b.reason, [(r.example, r.block) for r in b.requests])
                     for b in log])
    assert runs[0] == runs[1]
    reqs = [x for _, _, rs in runs[0] for x in rs]
    assert len(reqs) == len(set(reqs)) == sum(len(s.blocks) for s in data)
    plain, plog = make(data, spec=spec, budget=200, max_in_flight=40, ttl_steps=6, prefetch=16)
    run_all(plain, data)
    assert len(runs[0]) < len(plog)


@pytest.mark.parametrize("cut", [3, 20, 45])
def test_resume_with_coalescing_replays_the_uninterrupted_batches(cut):
    data = random_samples(200, seed=5)
    spec = BucketSpec.explicit({"text": [[8, 16, 24, 32, 40, 48, 60]],
                                "image": [[4, 5, 6, 8], [3, 4, 6, 8], [1]]})
    kw = dict(spec=spec, budget=150, max_in_flight=30, ttl_steps=5, coalesce_tokens=30)

    def trace(log):
        return [(b.mode, b.reason, [(r.example, r.block) for r in b.requests]) for b in log]

    d, full = make(data, **kw)
    run_all(d, data)
    d1, first = make(data, **kw)
    gen = d1.run(data)
    for st in gen:
        if st.index + 1 == cut:
            break
    state = pickle.loads(pickle.dumps(d1.state_dict()))
    gen.close()
    assert state["config"]["coalesce_tokens"] == 30
    d2, second = make(data, **kw)
    d2.load_state_dict(state)
    start = Dispatcher.resume_position(state)
    run_all(d2, data[start:], offset=start)
    assert trace(first) + trace(second) == trace(full)
    with pytest.raises(ValueError, match="config"):  # another price is another schedule
        d3, _ = make(data, **dict(kw, coalesce_tokens=31))
        d3.load_state_dict(state)
        next(iter(d3.run(data[start:], offset=start)))


def test_config_rejects_a_negative_price():
    with pytest.raises(ValueError, match="coalesce_tokens"):
        DispatchConfig(coalesce_tokens=-1)


def test_the_price_can_be_set_per_mode():
    data = [sample(f"t{n}", text(n)) for n in (10, 11, 12)]
    data += [sample(f"i{i}", Block("image", (4, 8, 1), "raw", b"")) for i in range(2)]
    spec = BucketSpec.explicit({"text": [[10, 11, 12, 20]], "image": [[4, 8], [4, 8], [1]]})
    d, log = make(data, spec=spec, budget=1000, max_in_flight=8,
                  mode_coalesce_tokens={"text": 100})
    run_all(d, data)
    assert sorted(len(b.requests) for b in log if b.mode == "text") == [3]
    d, log = make(data, spec=spec, budget=1000, max_in_flight=8, coalesce_tokens=100,
                  mode_coalesce_tokens={"text": None})
    run_all(d, data)
    assert sorted(len(b.requests) for b in log if b.mode == "text") == [1, 1, 1]
    assert DispatchConfig(coalesce_tokens=5, mode_coalesce_tokens={"a": 7}).coalesce_of("a") == 7
    with pytest.raises(ValueError, match="'text'"):
        DispatchConfig(mode_coalesce_tokens={"text": -2})
