"""The dispatcher: budgets, TTL, routing, generation, determinism, errors, metrics."""

from __future__ import annotations

import random

import pytest

from blocklm.formats import Block, Sample
from blocklm.pipeline.buckets import BucketSpec, estimate_buckets
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_split import split_first_axis
from blocklm.pipeline.dispatch_types import (
    DispatchConfig,
    OversizeBlockError,
    PrepareError,
    Result,
    UnknownModeError,
    generation_config,
)


def length_cost(mode, shape):
    """Cost = product of the shape: easy to compute by hand."""
    n = 1
    for d in shape:
        n *= d
    return max(1, n)


def text(n: int, content: str | None = None) -> Block:
    body = content if content is not None else "x" * n
    return Block("text", (n,), "utf8", body.encode())


def sample(key: str, *blocks: Block) -> Sample:
    return Sample(key, list(blocks))


def prep(block):
    """Inputs = targets = the block's (mode, shape, payload): no codec needed."""
    return (block.mode, block.shape, block.payload), block.payload


def random_samples(n: int, seed: int, modes=("text", "image")) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        blocks = []
        for _ in range(rng.randint(1, 4)):
            if rng.choice(modes) == "text":
                blocks.append(text(rng.randint(1, 60)))
            else:
                h, w = rng.choice([(8, 4), (4, 8), (6, 6), (5, 3)])
                blocks.append(Block("image", (h, w, 1), "raw", b""))
        out.append(sample(f"s{i}", *blocks))
    return out


def recording_runner(log):
    """Runner whose state is the list of (block, part) seen so far; output names the request."""

    def run(batch):
        log.append(batch)
        return [Result(state=(r.context or []) + [(r.block, r.part)],
                       output=(r.key, r.block, r.part, r.inputs)) for r in batch.requests]

    return run


def make(samples, runners_log=None, spec=None, **cfg):
    log = [] if runners_log is None else runners_log
    cfg.setdefault("prefetch", 0)
    config = DispatchConfig(**cfg)
    modes = sorted({b.mode for s in samples for b in s.blocks} | {"text"})
    d = Dispatcher({m: recording_runner(log) for m in modes}, spec, config, cost=length_cost,
                   prepare=prep)
    return d, log


def run_all(d, samples, **kw):
    finished, steps = [], []
    for st in d.run(samples, **kw):
        steps.append(st)
        finished += st.finished
    return steps, finished


@pytest.mark.parametrize("cap", [None, 3])
def test_budget_respected_by_every_batch(cap):
    samples = random_samples(150, seed=1)
    spec = estimate_buckets(((b.mode, b.shape) for s in samples for b in s.blocks), length_cost)
    d, log = make(samples, spec=spec, budget=120, max_in_flight=40, ttl_steps=8,
                  max_batch_samples=cap)
    steps, finished = run_all(d, samples)
    assert len(finished) == 150 and all(f.error is None for f in finished)
    assert log and len(log) == len(steps)
    for b in log:
        assert b.padded_cost <= 120
        pad = tuple(max(r.shape[i] for r in b.requests) for i in range(len(b.padded_shape)))
        assert b.padded_shape == pad
        assert b.padded_cost == len(b.requests) * length_cost(b.mode, pad)
        assert len({r.mode for r in b.requests}) == 1
        if cap:
            assert len(b.requests) <= cap
    assert sum(len(b.requests) for b in log) == sum(len(s.blocks) for s in samples)


def test_results_routed_to_their_example_and_block_in_order():
    samples = random_samples(80, seed=2)
    d, _ = make(samples, budget=100, max_in_flight=16, ttl_steps=5, keep_outputs=True)
    _, finished = run_all(d, samples)
    by_key = {s.key: s for s in samples}
    assert sorted(f.key for f in finished) == sorted(by_key)
    for f in finished:
        s = by_key[f.key]
        n = len(s.blocks)
        # the context state grew block by block, in order, through this example's requests only
        assert f.state == [(i, 0) for i in range(n)]
        assert [(b, part) for b, part, _ in f.outputs] == [(i, 0) for i in range(n)]
        for i, (_, _, (key, block, _, inputs)) in enumerate(f.outputs):
            assert (key, block) == (f.key, i)
            assert inputs == (s.blocks[i].mode, s.blocks[i].shape, s.blocks[i].payload)
        assert f.example == int(f.key[1:])  # example ids are source positions


def test_ttl_forces_a_lone_request_on_the_logical_clock():
    # a stream of length-10 texts fills a bucket every step (budget 20: 2 per batch); one
    # length-50 text sits alone in its bucket until its TTL (4 steps) forces it
    samples = [sample("lone", text(50))] + [sample(f"f{i}", text(10)) for i in range(40)]
    spec = BucketSpec.explicit({"text": [[10, 50]]})
    d, log = make(samples, spec=spec, budget=100, max_batch_samples=2, max_in_flight=8,
                  ttl_steps=4)
    run_all(d, samples)
    lone = [b for b in log if any(r.key == "lone" for r in b.requests)]
    assert len(lone) == 1 and lone[0].reason == "ttl"
    assert lone[0].step == 4  # enqueued at clock 0, aged 4 steps, forced on the 5th step
    assert all(b.reason == "full" for b in log[:4])
    m = d.metrics()["modes"]["text"]
    assert m["ttl_forced"] == 1 and m["reasons"]["ttl"] == 1


def test_wall_clock_ttl_option(monkeypatch):
    # a fake monotonic clock: 1 s passes at every reading. Two length-10 texts fill a bucket
    # (budget 20) each step; the lone length-50 one outlives its 2.5 s TTL after a few readings.
    import blocklm.pipeline.dispatch as dispatch_mod

    ticks = iter(range(10**6))
    monkeypatch.setattr(dispatch_mod.time, "monotonic", lambda: float(next(ticks)))
    samples = [sample("lone", text(50))] + [sample(f"f{i}", text(10)) for i in range(30)]
    spec = BucketSpec.explicit({"text": [[10, 50]]})
    d, log = make(samples, spec=spec, budget=100, max_batch_samples=2, max_in_flight=8,
                  ttl_seconds=2.5)
    run_all(d, samples)
    lone = [b for b in log if any(r.key == "lone" for r in b.requests)]
    assert len(lone) == 1 and lone[0].reason == "ttl" and 0 < lone[0].step < 10
    m = d.metrics()["modes"]["text"]
    assert m["ttl_forced"] == 1
    assert m["queue_age_p99"] >= 2.5  # ages are reported in seconds


def test_abandoning_a_run_stops_the_read_ahead_thread():
    import threading

    before = threading.active_count()
    samples = random_samples(300, seed=4)
    d, _ = make(samples, budget=100, max_in_flight=8, prefetch=8, prefetch_chunk=2)
    gen = d.run(samples)
    next(gen)
    assert threading.active_count() == before + 1
    gen.close()
    assert threading.active_count() == before
    # the same dispatcher continues with the rest of the source, never re-reads it from 0
    with pytest.raises(ValueError, match="still in flight"):
        next(d.run(samples))
    _, finished = run_all(d, samples[d.drawn:], offset=d.drawn)
    assert d.metrics()["examples_finished"] == 300


def test_generation_loop_with_toy_runner():
    # prompts of one text block; the runner samples a block and asks for the next one
    # (alternating text and image) until the example holds 5 blocks
    def runner(batch):
        out = []
        for r in batch.requests:
            n = len(r.context or []) + 1
            nxt = None if n >= 5 else (("image", (2, 2, 1)) if n % 2 else ("text", (n,)))
            sampled = None if r.inputs is not None else f"{r.mode}{r.block}"
            out.append(Result(state=(r.context or []) + [r.block], next=nxt, block=sampled))
        return out

    prompts = [sample(f"p{i}", text(i + 1)) for i in range(6)]
    d = Dispatcher({"text": runner, "image": runner}, None,
                   generation_config(prefetch=0, ttl_seconds=None, ttl_steps=2, budget=64),
                   cost=length_cost, prepare=prep)
    _, finished = run_all(d, prompts)
    assert len(finished) == 6
    for f in finished:
        assert f.state == [0, 1, 2, 3, 4]
        assert f.generated == [("image", (2, 2, 1), "image1"), ("text", (2,), "text2"),
                               ("image", (2, 2, 1), "image3"), ("text", (4,), "text4")]
    assert d.metrics()["steps_by_mode"].keys() == {"text", "image"}


def test_generation_is_capped_by_max_blocks():
    def forever(batch):
        return [Result(next=("text", (1,))) for _ in batch.requests]

    d = Dispatcher({"text": forever}, None, DispatchConfig(prefetch=0, max_blocks=7),
                   prepare=prep)
    _, finished = run_all(d, [sample("a", text(1))])
    assert len(finished) == 1 and d.metrics()["truncated"] == 1
    assert d.metrics()["modes"]["text"]["requests"] == 7


def test_generation_with_invalid_next_shape_is_rejected():
    def bad(batch):
        return [Result(next=("text", (-1,))) for _ in batch.requests]

    d = Dispatcher({"text": bad}, None, DispatchConfig(prefetch=0), prepare=prep)
    _, finished = run_all(d, [sample("a", text(1)), sample("b", text(2))])
    assert [f.key for f in finished] == ["a", "b"]
    assert all("invalid shape (-1,)" in str(f.error) and "block 1" in str(f.error)
               for f in finished)
    assert d.metrics()["rejected"] == {"DispatchError": 2}


@pytest.mark.parametrize("workers", [1, 3])
def test_deterministic_with_prefetch_thread(workers):
    samples = random_samples(200, seed=3)
    spec = estimate_buckets(((b.mode, b.shape) for s in samples for b in s.blocks), length_cost)

    def trace():
        d, log = make(samples, spec=spec, budget=150, max_in_flight=32, ttl_steps=6,
                      prefetch=16, prefetch_chunk=4, decode_workers=workers)
        run_all(d, samples)
        return [(b.mode, b.reason, [(r.example, r.block) for r in b.requests]) for b in log]

    a, b = trace(), trace()
    assert a == b and len(a) > 20


def test_oversize_block_rejected_counted_and_never_stalls():
    samples = [sample("ok1", text(5)), sample("big", text(5), text(500), text(5)),
               sample("ok2", text(5), text(5))]
    d, log = make(samples, budget=100, keep_outputs=True)
    _, finished = run_all(d, samples)
    by = {f.key: f for f in finished}
    assert set(by) == {"ok1", "big", "ok2"}
    err = by["big"].error
    assert isinstance(err, OversizeBlockError)
    assert "'big'" in str(err) and "block 1" in str(err) and "500" in str(err)
    assert [o[:2] for _, _, o in by["big"].outputs] == [("big", 0)]  # block 0 ran, then stop
    assert by["ok2"].error is None and len(by["ok2"].outputs) == 2
    assert d.metrics()["rejected"] == {"OversizeBlockError": 1}
    assert d.errors == [err]

    d, _ = make(samples, budget=100, on_oversize="raise")
    with pytest.raises(OversizeBlockError, match="block 1"):
        run_all(d, samples)


def test_oversize_block_split_when_mode_supports_it():
    samples = [sample("long", text(25, "abcdefghijklmnopqrstuvwxy"))]
    log = []
    d = Dispatcher({"text": recording_runner(log)}, None,
                   DispatchConfig(prefetch=0, budget=10, keep_outputs=True),
                   cost=length_cost, prepare=lambda b: (b.payload.decode(), None),
                   splitters={"text": split_first_axis})
    _, finished = run_all(d, samples)
    assert finished[0].error is None
    assert [(o[1], o[2], o[3]) for _, _, o in finished[0].outputs] == [
        (0, 0, "abcdefghij"), (0, 1, "klmnopqrst"), (0, 2, "uvwxy")]
    assert [r.shape for b in log for r in b.requests] == [(10,), (10,), (5,)]


def test_unknown_mode_is_a_startup_error():
    spec = BucketSpec.explicit({"text": [[10]], "audio": [[100], [1]]})
    with pytest.raises(UnknownModeError, match="audio"):
        Dispatcher({"text": lambda b: []}, spec)
    with pytest.raises(ValueError):
        Dispatcher({}, None)
    # a block whose mode the index did not announce is rejected when it comes, and counted
    d, _ = make([], budget=100)
    samples = [sample("odd", Block("video", (2,), "raw", b"")), sample("fine", text(2))]
    _, finished = run_all(d, samples)
    by = {f.key: f for f in finished}
    assert isinstance(by["odd"].error, UnknownModeError) and by["fine"].error is None
    assert d.metrics()["rejected"] == {"UnknownModeError": 1}


def test_prepare_error_is_counted_and_source_error_raised():
    def bad_prepare(block):
        if block.payload == b"bad":
            raise ValueError("cannot decode")
        return prep(block)

    d = Dispatcher({"text": recording_runner([])}, None, DispatchConfig(prefetch=4),
                   prepare=bad_prepare)
    samples = [sample("a", text(3, "bad")), sample("b", text(3))]
    _, finished = run_all(d, samples)
    by = {f.key: f for f in finished}
    assert isinstance(by["a"].error, PrepareError) and "cannot decode" in str(by["a"].error)
    assert "'a'" in str(by["a"].error) and "block 0" in str(by["a"].error)
    assert by["b"].error is None

    def broken_source():
        yield sample("a", text(3))
        raise OSError("shard vanished")

    d = Dispatcher({"text": recording_runner([])}, None, DispatchConfig(prefetch=4), prepare=prep)
    with pytest.raises(OSError, match="shard vanished"):
        run_all(d, broken_source())


def test_runner_returning_wrong_number_of_results_is_an_error():
    d = Dispatcher({"text": lambda b: []}, None, DispatchConfig(prefetch=0), prepare=prep)
    with pytest.raises(ValueError, match="0 results for a batch of 1"):
        run_all(d, [sample("a", text(3))])


def test_metrics_against_hand_computed_values():
    # budget 10, cost = length, cap 2, explicit single bucket (FIFO):
    #   step 0: [4, 3]  -> padded 2*4 = 8,  cost 7, full (cap) ; ages 0, 0
    #   step 1: [5, 2]  -> padded 2*5 = 10, cost 7, full       ; ages 1, 1
    #   step 2: [4]     -> padded 4,        cost 4, drain      ; age 2 (a second 4 would fit)
    samples = [sample(f"e{i}", text(n)) for i, n in enumerate([4, 3, 5, 2, 4])]
    d, log = make(samples, spec=BucketSpec.fifo(["text"]), budget=10, max_batch_samples=2,
                  max_in_flight=5)
    run_all(d, samples)
    assert [b.reason for b in log] == ["full", "full", "drain"]
    m = d.metrics()
    t = m["modes"]["text"]
    assert t["batches"] == 3 and t["requests"] == 5
    assert t["padding_ratio"] == pytest.approx((22 - 18) / 22)
    assert t["batch_fill"] == pytest.approx((0.8 + 1.0 + 0.4) / 3)
    assert t["tokens_per_batch_mean"] == pytest.approx(22 / 3)
    assert t["tokens_per_batch_var"] == pytest.approx((64 + 100 + 16) / 3 - (22 / 3) ** 2)
    assert t["queue_age_p50"] == 1 and t["queue_age_p99"] == 2
    assert t["ttl_forced"] == 0 and t["ttl_forced_fraction"] == 0.0
    assert t["reasons"] == {"full": 2, "drain": 1} and t["pending"] == 0
    assert m["steps"] == 3 and m["clock"] == 3 and m["empty_steps"] == 0
    assert m["examples_admitted"] == 5 and m["examples_finished"] == 5
    assert m["examples_in_flight"] == 0
    assert m["examples_in_flight_mean"] == pytest.approx((5 + 3 + 1) / 3)


def test_stall_runs_the_fullest_partial_bucket():
    # K = 2 examples in flight, nothing can fill a budget of 100: the dispatcher must not wait
    samples = [sample(f"e{i}", text(n), text(n)) for i, n in enumerate([3, 30, 4, 40])]
    spec = BucketSpec.explicit({"text": [[10, 100]]})
    d, log = make(samples, spec=spec, budget=100, max_in_flight=2)
    _, finished = run_all(d, samples)
    assert len(finished) == 4
    assert log[0].reason == "stall" and log[0].requests[0].key == "e1"  # 30 > 3 pending cost
    assert log[-1].reason == "drain"


def _image(n: int = 5) -> Block:
    return Block("image", (n, n, 1), "raw", b"")


@pytest.mark.parametrize("weight, first", [(None, "image"), (1.0, "image"), (0.25, "text")])
def test_stall_weight_lets_a_mode_wait_for_a_fuller_batch(weight, first):
    # nothing fills the budget of 100: at the first stall the image bucket holds 2 x 25 = 50
    # pending tokens, the text bucket 2 x 10 = 20; weighted 0.25 the images count 12.5 there,
    # so the text runs first and the images wait (then run together)
    samples = [sample("e0", _image(), text(3)), sample("e1", _image(), text(3)),
               sample("e2", text(10), text(10)), sample("e3", text(10), text(10))]
    spec = BucketSpec.explicit({"text": [[10, 100]], "image": [[5], [5], [1]]})
    cfg = {} if weight is None else {"mode_stall_weight": {"image": weight}}
    d, log = make(samples, spec=spec, budget=100, max_in_flight=4, **cfg)
    _, finished = run_all(d, samples)
    assert len(finished) == 4 and all(f.error is None for f in finished)
    assert log[0].reason == "stall" and log[0].mode == first
    images = [b for b in log if b.mode == "image"]
    assert len(images) == 1 and len(images[0].requests) == 2


def test_stall_weight_still_bounded_by_the_ttl():
    # however small the weight, a waiting image runs once its request outlives the TTL
    samples = [sample("e0", _image(), text(3))] + [
        sample(f"t{i}", *[text(10)] * 6) for i in range(3)]
    spec = BucketSpec.explicit({"text": [[10, 100]], "image": [[5], [5], [1]]})
    d, log = make(samples, spec=spec, budget=100, max_in_flight=4, ttl_steps=2,
                 mode_stall_weight={"image": 1e-6})
    run_all(d, samples)
    at = [i for i, b in enumerate(log) if b.mode == "image"]
    assert len(at) == 1 and log[at[0]].reason == "ttl" and at[0] == 2


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "0.5"])
def test_stall_weight_refuses_what_is_not_a_positive_number(bad):
    with pytest.raises(ValueError, match="mode_stall_weight of 'image'"):
        DispatchConfig(mode_stall_weight={"image": bad})

