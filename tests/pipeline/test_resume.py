"""Exact resumption: stop anywhere, resume, and get exactly the samples not yet seen.

In process (any cut point, shuffled or not, resumed twice), through torchdata's
``StatefulDataLoader`` with 0, 1 and 2 workers, and across a change of worker count.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blocklm.pipeline import BlockDataset, StateError

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")
StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader


def make(path, **kw):
    kw.setdefault("seed", 5)
    kw.setdefault("shuffle_buffer", 40)
    kw.setdefault("piece_samples", 16)
    return BlockDataset(path, **kw)


def roundtrip(state):
    return json.loads(json.dumps(state))  # states are plain JSON


def take(it, n):
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def flat(batches):
    return [s.key for b in batches for s in (b if isinstance(b, list) else [b])]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 320), cut2=st.integers(0, 320), shuffle=st.booleans(),
       epoch=st.integers(0, 3))
def test_resume_in_process_at_any_cut(small_shards, cut, cut2, shuffle, epoch):
    full = make(small_shards, shuffle=shuffle)
    full.set_epoch(epoch)
    order = [s.key for s in full]

    a = make(small_shards, shuffle=shuffle)
    a.set_epoch(epoch)
    it = iter(a)
    first = [s.key for s in take(it, cut)]
    state = roundtrip(a.state_dict())

    b = make(small_shards, shuffle=shuffle)
    b.load_state_dict(state)
    it = iter(b)
    second = [s.key for s in take(it, cut2)]
    state2 = roundtrip(b.state_dict())

    c = make(small_shards, shuffle=shuffle)
    c.load_state_dict(state2)
    rest = [s.key for s in c]
    assert first + second + rest == order
    assert c.stats.samples == len(order)


def test_state_of_another_dataset_is_refused(small_shards):
    a = make(small_shards)
    next(iter(a))
    with pytest.raises(StateError):
        make(small_shards, seed=6).load_state_dict(a.state_dict())


def test_next_epoch_after_a_resumed_one_is_whole(small_shards, small_keys):
    a = make(small_shards)
    it = iter(a)
    take(it, 100)
    b = make(small_shards)
    b.load_state_dict(a.state_dict())
    assert len(list(b)) == len(small_keys) - 100
    b.set_epoch(1)
    assert sorted(s.key for s in b) == sorted(small_keys)


def loader(ds, workers, batch):
    kw = {"multiprocessing_context": "fork"} if workers else {}
    return StatefulDataLoader(ds, batch_size=batch, num_workers=workers,
                              collate_fn=list if batch else None, **kw)


@pytest.mark.parametrize("workers", [0, 1, 2])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 70), batch=st.sampled_from([None, 4]), shuffle=st.booleans())
def test_stateful_dataloader_resume(small_shards, small_keys, workers, cut, batch, shuffle):
    dl = loader(make(small_shards, shuffle=shuffle), workers, batch)
    it = iter(dl)
    first = flat(take(it, cut))
    state = dl.state_dict()
    del it, dl

    dl2 = loader(make(small_shards, shuffle=shuffle), workers, batch)
    dl2.load_state_dict(state)
    rest = flat(list(dl2))
    seen = Counter(first + rest)
    assert sorted(seen) == sorted(small_keys) and max(seen.values()) == 1


@pytest.mark.parametrize("before,after", [(2, 1), (2, 0), (1, 2), (0, 2)])
def test_resume_across_a_change_of_worker_count(small_shards, small_keys, before, after):
    dl = loader(make(small_shards), before, 4)
    it = iter(dl)
    first = flat(take(it, 13))
    state = roundtrip(dl.state_dict()) if before == 0 else dl.state_dict()
    del it, dl

    ds = make(small_shards)
    ds.load_state_dict(state)  # the whole loader state: merged over the old workers
    rest = flat(list(loader(ds, after, 4)))
    seen = Counter(first + rest)
    assert sorted(seen) == sorted(small_keys) and max(seen.values()) == 1


def test_mixture_resumes_exactly(small_shards, tmp_path):
    def mixed():
        a = make(small_shards, seed=1)
        b = make(small_shards, seed=2, transform=lambda s: "b:" + s.key)
        return BlockDataset.mix([a, b], weights=[2, 1], seed=9, stop="all")

    def name(x):
        return x if isinstance(x, str) else "a:" + x.key

    order = [name(x) for x in mixed()]
    m = mixed()
    it = iter(m)
    first = [name(x) for x in take(it, 111)]
    m2 = mixed()
    m2.load_state_dict(roundtrip(m.state_dict()))
    rest = [name(x) for x in m2]
    assert first + rest == order


def test_mixture_resumes_through_a_stateful_dataloader(small_shards, small_keys):
    def mixed():
        return BlockDataset.mix([make(small_shards, seed=1), make(small_shards, seed=2)],
                                weights=[1, 1], seed=3, stop="all")

    dl = loader(mixed(), 2, 4)
    it = iter(dl)
    first = flat(take(it, 30))
    state = dl.state_dict()
    del it, dl
    dl2 = loader(mixed(), 2, 4)
    dl2.load_state_dict(state)
    rest = flat(list(dl2))
    seen = Counter(first + rest)
    assert len(first) == 120 and sorted(seen) == sorted(small_keys)
    assert all(v == 2 for v in seen.values())  # each key once from each of the two sources


@pytest.mark.parametrize("how", ["loader", "dataset"])
def test_resumed_epoch_then_next_epoch_whole_with_workers(small_shards, small_keys, how):
    ds = make(small_shards)
    ds.set_epoch(3)
    dl = loader(ds, 2, 4)
    it = iter(dl)
    first = flat(take(it, 10))
    state = dl.state_dict()
    del it, dl

    ds2 = make(small_shards)
    ds2.set_epoch(3)
    dl2 = loader(ds2, 2, 4)
    if how == "loader":
        dl2.load_state_dict(state)
    else:
        ds2.load_state_dict(state)
    rest = flat(list(dl2))
    assert sorted(first + rest) == sorted(small_keys)
    ds2.set_epoch(4)
    again = flat(list(dl2))
    assert sorted(again) == sorted(small_keys)
    ds.set_epoch(4)
    assert again == flat(list(loader(ds, 2, 4)))  # epoch 4 is epoch 4, resumed or not
