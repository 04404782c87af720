"""state_dict / load_state_dict: a resumed run forms exactly the batches of an uninterrupted one."""

from __future__ import annotations

import pickle
import random

import pytest

from blocklm.formats import Block, Sample
from blocklm.pipeline.buckets import estimate_buckets
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig, Result


def samples(n: int = 120) -> list[Sample]:
    rng = random.Random(7)
    out = []
    for i in range(n):
        blocks = [Block("text", (rng.randint(1, 40),), "raw", b"") for _ in range(rng.randint(1, 4))]
        if rng.random() < 0.3:
            blocks.append(Block("image", rng.choice([(4, 8, 1), (8, 4, 1)]), "raw", b""))
        out.append(Sample(f"k{i}", blocks))
    return out


def cost(mode, shape):
    n = 1
    for d in shape:
        n *= d
    return n


DATA = samples()
SPEC = estimate_buckets(((b.mode, b.shape) for s in DATA for b in s.blocks), cost)


def make(trace, **over):
    def runner(batch):
        trace.append((batch.step, batch.mode, batch.reason,
                      [(r.example, r.block, r.context) for r in batch.requests]))
        return [Result(state=(r.context or 0) + r.block + 1) for r in batch.requests]

    cfg = dict(budget=90, max_in_flight=12, ttl_steps=5, decode=False, prefetch=8,
               prefetch_chunk=2)
    cfg.update(over)
    return Dispatcher({"text": runner, "image": runner}, SPEC, DispatchConfig(**cfg), cost=cost)


@pytest.mark.parametrize("over", [{}, {"mode_stall_weight": {"image": 0.3}}])
@pytest.mark.parametrize("cut", [1, 17, 60])
def test_resume_replays_the_uninterrupted_batches(cut, over):
    full: list = []
    d = make(full, **over)
    done_full = sorted(f.key for st in d.run(DATA) for f in st.finished)
    assert len(done_full) == len(DATA) and len(full) > cut + 5

    first: list = []
    d1 = make(first, **over)
    gen = d1.run(DATA)
    done = []
    for st in gen:
        done += [f.key for f in st.finished]
        if st.index + 1 == cut:
            break
    state = pickle.loads(pickle.dumps(d1.state_dict()))  # what torch.save would store
    gen.close()  # stops the prefetch thread

    second: list = []
    d2 = make(second, **over)
    d2.load_state_dict(state)
    start = Dispatcher.resume_position(state)
    assert start <= state["drawn"]
    for st in d2.run(DATA[start:], offset=start):
        done += [f.key for f in st.finished]
    assert first + second == full
    assert sorted(done) == done_full
    m, m_full = d2.metrics(), d.metrics()
    assert m["modes"] == m_full["modes"] and m["steps"] == m_full["steps"]


def test_resume_checks_source_and_config():
    d1 = make([])
    gen = d1.run(DATA)
    next(gen)
    state = d1.state_dict()
    gen.close()
    start = Dispatcher.resume_position(state)
    with pytest.raises(ValueError, match="expects"):
        d2 = make([])
        d2.load_state_dict(state)
        shifted = DATA[start + 1:]
        list(d2.run(shifted, offset=start))
    with pytest.raises(ValueError, match="saved with config"):
        d3 = make([], budget=91)
        d3.load_state_dict(state)
        list(d3.run(DATA))
    with pytest.raises(ValueError, match="saved with config.*mode_stall_weight"):
        d5 = make([], mode_stall_weight={"image": 0.5})  # other batches from here on
        d5.load_state_dict(state)
        list(d5.run(DATA))
    with pytest.raises(ValueError, match="from position"):
        d4 = make([])
        d4.load_state_dict(state)
        list(d4.run(DATA[start + 1:], offset=start + 1))


class CountingSource:
    """A loader stand-in with a state: how many samples it has yielded."""

    def __init__(self, data, start=0):
        self.data, self.pos = data, start

    def __iter__(self):
        while self.pos < len(self.data):
            self.pos += 1
            yield self.data[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}


@pytest.mark.parametrize("cut,prefetch", [(5, 8), (40, 8), (40, 0)])
def test_resume_from_saved_samples_and_source_state(cut, prefetch):
    full: list = []
    d = make(full, prefetch=prefetch)
    for _ in d.run(DATA):
        pass

    first: list = []
    d1 = make(first, prefetch=prefetch)
    src = CountingSource(DATA)
    gen = d1.run(src)
    for st in gen:
        if st.index + 1 == cut:
            break
    state = pickle.loads(pickle.dumps(d1.state_dict(samples=True,
                                                     source_state=src.state_dict)))
    gen.close()
    # what the source had yielded = what the dispatcher took + what the read-ahead held
    assert state["source_state"]["pos"] == state["drawn"] + len(state["read_ahead"])
    assert [p for p, _ in state["read_ahead"]] == list(range(state["drawn"],
                                                            state["source_state"]["pos"]))

    second: list = []
    d2 = make(second, prefetch=prefetch)
    d2.load_state_dict(state)
    for _ in d2.run(CountingSource(DATA, start=state["source_state"]["pos"])):
        pass
    assert first + second == full
    assert d2.metrics()["modes"] == d.metrics()["modes"]
    with pytest.raises(ValueError, match="samples=True"):
        d2.state_dict(source_state=src.state_dict)
