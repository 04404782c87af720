"""Shape buckets: exact and quantile boundaries, N-dimensional keys, merging, JSON, cost model."""

from __future__ import annotations

import random

import pytest

from blocklm.pipeline.buckets import BucketSpec, ModeBuckets, estimate_buckets
from blocklm.pipeline.cost import DefaultCost, ModeCost, cost_from_supports, default_cost


def test_few_distinct_values_become_exact_bounds():
    shapes = [("image", (480, 320, 3))] * 77 + [("image", (320, 480, 3))] * 23
    spec = estimate_buckets(shapes, min_share=0)
    mb = spec.of("image")
    assert mb.bounds == ((320, 480), (320, 480), (3,))
    # landscape and portrait never share a bucket: batched by exact shape, zero padding
    assert mb.key((480, 320, 3)) == (1, 0, 0)
    assert mb.key((320, 480, 3)) == (0, 1, 0)
    assert mb.key((300, 300, 3)) == (0, 0, 0)  # a smaller shape goes to the first bound above it


def test_cost_weighted_quantiles_without_split():
    # 100 shapes of length 1..100 with cost = length: cost-weighted quartiles are where the
    # running sum of lengths passes 1/4, 2/4, 3/4 of 5050, i.e. at 50, 71, 87 (and the max 100).
    shapes = [("text", (n,)) for n in range(1, 101)]
    spec = estimate_buckets(shapes, buckets_per_dim=4, exact_max=8, max_width=None, min_share=0)
    assert spec.of("text").bounds == ((50, 71, 87, 100),)
    # the last quartile holds 88..100: each bucket holds about a quarter of the tokens
    assert sum(range(88, 101)) == pytest.approx(5050 / 4, rel=0.05)


def test_width_split_caps_relative_width():
    rng = random.Random(1)
    shapes = [("audio", (rng.randint(1000, 20000), 1)) for _ in range(3000)]
    spec = estimate_buckets(shapes, buckets_per_dim=4, max_width=0.1, min_share=0)
    b = spec.of("audio").bounds[0]
    values = sorted({s[0] for _, s in shapes})
    # below the 5% cost quantile widths are measured against that quantile (few tokens there)
    weights = sorted(s[0] for _, s in shapes)
    total, acc, floor = sum(weights), 0, None
    for w in weights:
        acc += w
        if floor is None and acc * 20 >= total:
            floor = w
    lo = values[0]
    for hi in b:
        first = min(v for v in values if v >= lo)
        assert hi - first <= 0.1 * max(hi, floor)
        lo = hi + 1
    assert len(b) > 4  # the split added bounds


def test_rare_cells_merge_into_least_padding_cell():
    shapes = ([("image", (480, 320, 3))] * 50 + [("image", (320, 480, 3))] * 50
              + [("image", (276, 276, 3))])
    spec = estimate_buckets(shapes, min_share=0.05)
    mb = spec.of("image")
    # the lone 276x276 joins a big bucket whose shape dominates it instead of waiting for a TTL
    assert mb.key((276, 276, 3)) in (mb.key((480, 320, 3)), mb.key((320, 480, 3)))
    assert mb.key((480, 320, 3)) != mb.key((320, 480, 3))
    # without merging it keeps its own bucket
    assert len({estimate_buckets(shapes, min_share=0).of("image").key(s) for _, s in shapes}) == 3


def test_merge_respects_padding_cap():
    shapes = [("text", (1000,))] * 100 + [("text", (10,))]
    spec = estimate_buckets(shapes, min_share=0.05, max_merge_pad=0.005)
    mb = spec.of("text")
    assert mb.key((10,)) != mb.key((1000,))  # merging would pad 990 tokens: over the cap


def test_odd_ndim_and_overflow_and_single():
    mb = ModeBuckets(((10, 20),))
    assert mb.key((25,)) == (2,)  # overflow bucket, still served
    assert mb.key((5, 5)) == (-3,)  # another number of dims: its own bucket
    spec = BucketSpec.fifo(["text"])
    assert spec.of("text").key((5,)) == spec.of("text").key((500,))
    assert spec.of("unlisted").key((5,)) == spec.of("unlisted").key((7,))
    with pytest.raises(ValueError, match="strictly increasing"):
        ModeBuckets(((20, 10),))


def test_json_roundtrip(tmp_path):
    shapes = [("image", (480, 320, 3))] * 50 + [("image", (276, 276, 3))] + [
        ("text", (n,)) for n in range(1, 300)]
    spec = estimate_buckets(shapes, min_share=0.01)
    path = tmp_path / "buckets.json"
    spec.save(path)
    again = BucketSpec.load(path)
    assert again == spec
    for m, s in shapes:
        assert again.of(m).key(s) == spec.of(m).key(s)
    explicit = BucketSpec.explicit({"text": [[64, 128]], "image": None})
    assert explicit.of("text").key((100,)) == (1,)
    assert BucketSpec.from_json({"text": [[64, 128]]}) == BucketSpec.explicit({"text": [[64, 128]]})


def test_default_cost_rules():
    c = DefaultCost()
    assert c("text", (37,)) == 37
    assert c("image", (480, 320, 3)) == 30 * 20
    assert c("image", (17, 16, 1)) == 2 * 1
    assert c("audio", (3217, 1)) == 21
    assert c("other", (2, 3)) == 6
    assert c("text", (0,)) == 1  # every block costs its start token
    assert default_cost("text", ()) == 1


def test_cost_from_supports_and_memo():
    class Support:
        def steps(self, shape):
            return shape[0] * 2

    cost = cost_from_supports({"text": Support()})
    assert cost("text", (5,)) == 10
    assert cost("audio", (320, 1)) == 2  # falls back to the default rule
    calls = []

    def fn(mode, shape):
        calls.append(shape)
        return shape[0]

    mc = ModeCost("text", fn, max_entries=1)
    assert mc((3,)) == 3 and mc((3,)) == 3 and mc((4,)) == 4 and mc((4,)) == 4
    assert calls == [(3,), (4,), (4,)]  # memo capped at one entry
    with pytest.raises(ValueError, match="negative"):
        ModeCost("text", lambda m, s: -1)((1,))


def test_max_width_per_mode():
    shapes = [("text", (n,)) for n in range(1, 401)] + [("audio", (n, 1)) for n in range(1, 401)]
    spec = estimate_buckets(shapes, lambda m, s: s[0], max_width={"audio": 0.06}, min_share=0)
    plain = estimate_buckets(shapes, lambda m, s: s[0], max_width=None, min_share=0)
    split = estimate_buckets(shapes, lambda m, s: s[0], max_width=0.06, min_share=0)
    assert spec.of("text").bounds == plain.of("text").bounds  # not in the mapping: quantiles
    assert spec.of("audio").bounds == split.of("audio").bounds
    assert len(spec.of("audio").bounds[0]) > len(spec.of("text").bounds[0])
