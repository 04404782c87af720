"""Weighted mixtures: proportions follow the weights, deterministic under the seed."""

from __future__ import annotations

import pytest

from blocklm.pipeline import BlockDataset


def source(path, tag, seed):
    return BlockDataset(path, seed=seed, transform=lambda s: (tag, s.key))


def test_weights_set_the_proportions_and_the_seed_the_order(small_shards):
    def mixed(seed):
        return BlockDataset.mix([source(small_shards, "a", 1), source(small_shards, "b", 2),
                                 source(small_shards, "c", 3)], weights=[6, 3, 1], seed=seed)

    got = list(mixed(0))
    assert got == list(mixed(0)) and got != list(mixed(1))
    tags = [t for t, _ in got]
    n = len(tags)
    # stop="first": the heaviest source runs out first, after ~all of its samples
    assert 280 <= tags.count("a") <= 302
    assert abs(tags.count("a") / n - 0.6) < 0.06
    assert abs(tags.count("b") / n - 0.3) < 0.06
    assert abs(tags.count("c") / n - 0.1) < 0.05
    for t in "abc":  # no sample twice within a source
        ks = [k for tag, k in got if tag == t]
        assert len(ks) == len(set(ks))


def test_stop_all_drains_every_source(small_shards, small_keys):
    m = BlockDataset.mix([source(small_shards, "a", 1), source(small_shards, "b", 2)],
                         weights=[0.9, 0.1], seed=4, stop="all")
    got = list(m)
    assert sorted(k for t, k in got if t == "a") == sorted(small_keys)
    assert sorted(k for t, k in got if t == "b") == sorted(small_keys)
    m.set_epoch(1)
    assert list(m) != got


def test_zero_weight_source_is_never_drawn(small_shards):
    m = BlockDataset.mix([source(small_shards, "a", 1), source(small_shards, "b", 2)],
                         weights=[1, 0], seed=0)
    assert {t for t, _ in m} == {"a"}


def test_bad_weights(small_shards):
    a = source(small_shards, "a", 1)
    for w in ([1], [-1, 2], [0, 0]):
        with pytest.raises(ValueError):
            BlockDataset.mix([a, a], weights=w)
