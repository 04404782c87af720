"""Shape buckets: per-mode, per-dimension boundaries that split a mode's queue by shape.

A mode's buckets are given by one sorted tuple of *inclusive upper bounds* per dimension. A shape
falls into the bucket ``(i_0, ..., i_{n-1})`` where ``i_d`` is the first bound of dimension ``d``
that is ``>= shape[d]`` (``len(bounds[d])`` past the last bound: an overflow bucket, still served).
So an image ``(480, 320, 3)`` and ``(320, 480, 3)`` never share a bucket when 320 and 480 are
bounds of both dimensions. A mode with ``bounds=None`` has a single bucket (plain FIFO); shapes of
another number of dimensions than the mode's bounds go to a bucket of their own per ``ndim``.

Boundaries come from the data, never from payloads: :func:`estimate_buckets` takes ``(mode,
shape)`` pairs (e.g. :func:`shapes_from_index` over a dataset's shard indexes) and per dimension
uses every distinct value when there are few (exact shapes: images batch with zero padding), else
*cost-weighted* quantiles (each bucket holds about the same number of tokens, so each fills its
batches at about the same rate and few are forced by the TTL), then splits any bucket wider than
``max_width`` (relative: ``(hi - lo) / hi``) so that padding inside a bucket stays small.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from .cost import CostFn, Shape, default_cost


@dataclass(frozen=True)
class ModeBuckets:
    """Bucket boundaries of one mode: a sorted tuple of inclusive upper bounds per dimension."""

    bounds: tuple[tuple[int, ...], ...] | None

    def __post_init__(self) -> None:
        if self.bounds is not None:
            b = tuple(tuple(int(v) for v in dim) for dim in self.bounds)
            for dim in b:
                if list(dim) != sorted(set(dim)):
                    raise ValueError(f"bucket bounds must be strictly increasing, got {dim}")
            object.__setattr__(self, "bounds", b)

    def key(self, shape: Shape) -> tuple[int, ...]:
        """The bucket of ``shape`` (see the module docstring)."""
        b = self.bounds
        if b is None:
            return ()
        if len(shape) != len(b):
            return (-1 - len(shape),)
        return tuple([bisect_left(d, s) for d, s in zip(b, shape)])

    def upper(self, key: tuple[int, ...]) -> Shape | None:
        """The largest shape of bucket ``key`` (``None`` for single, overflow and odd buckets)."""
        if self.bounds is None or len(key) != len(self.bounds):
            return None
        if any(i >= len(d) for i, d in zip(key, self.bounds)):
            return None
        return tuple(d[i] for i, d in zip(key, self.bounds))


@dataclass(frozen=True)
class BucketSpec:
    """The buckets of every mode. A mode not listed gets a single bucket."""

    modes: Mapping[str, ModeBuckets]

    def of(self, mode: str) -> ModeBuckets:
        return self.modes.get(mode, SINGLE)

    @classmethod
    def explicit(cls, bounds: Mapping[str, Sequence[Sequence[int]] | None]) -> BucketSpec:
        """``{"text": [[64, 128, 256]], "image": [[320, 480], [320, 480], [1, 3]]}``."""
        return cls({m: ModeBuckets(None if b is None else tuple(tuple(d) for d in b))
                    for m, b in bounds.items()})

    @classmethod
    def fifo(cls, modes: Iterable[str]) -> BucketSpec:
        """One bucket per mode: plain FIFO batching (the benchmark's baseline)."""
        return cls({m: SINGLE for m in modes})

    def to_json(self) -> dict:
        return {m: (None if b.bounds is None else [list(d) for d in b.bounds])
                for m, b in sorted(self.modes.items())}

    @classmethod
    def from_json(cls, obj: Mapping) -> BucketSpec:
        return cls.explicit(obj)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> BucketSpec:
        return cls.from_json(json.loads(Path(path).read_text()))


SINGLE = ModeBuckets(None)


def _dim_bounds(values: Mapping[int, int], n: int, exact_max: int,
                max_width: float | None) -> list[int]:
    """Bounds of one dimension from ``{value: weight}``."""
    xs = sorted(values)
    if len(xs) <= exact_max:
        return xs
    total = sum(values.values())
    bounds: list[int] = []
    acc, k = 0, 1
    for x in xs:  # cost-weighted quantiles: a bound where the running weight passes k/n
        acc += values[x]
        if acc * n >= k * total:
            bounds.append(x)
            while acc * n >= k * total:
                k += 1
    if not bounds or bounds[-1] != xs[-1]:
        bounds.append(xs[-1])
    if max_width is None:
        return bounds
    # Split buckets wider than max_width: start a sub-bucket at the first value that the current
    # one's smallest value could not share a batch with within max_width padding. Below the 5%
    # cost quantile the width is measured against that quantile instead: small shapes carry
    # little cost, and splitting them finely would only leave many buckets that rarely fill.
    acc, floor = 0, xs[-1]
    for x in xs:
        acc += values[x]
        if acc * 20 >= total:
            floor = x
            break
    out: list[int] = []
    lo_i = 0
    for b in bounds:
        hi_i = bisect_left(xs, b)
        start = xs[lo_i]
        for i in range(lo_i, hi_i + 1):
            if xs[i] - start > max_width * max(xs[i], floor):
                out.append(xs[i - 1])
                start = xs[i]
        out.append(b)
        lo_i = hi_i + 1
    return out


def estimate_buckets(
    shapes: Iterable[tuple[str, Shape]],
    cost: CostFn = default_cost,
    *,
    buckets_per_dim: int = 16,
    exact_max: int = 16,
    max_width: float | None = 0.08,
) -> BucketSpec:
    """Bucket boundaries from ``(mode, shape)`` pairs (see the module docstring).

    ``buckets_per_dim`` cost-weighted quantiles per dimension (before splitting), used when a
    dimension has more than ``exact_max`` distinct values; ``max_width`` caps a bucket's
    relative width ``(hi - lo) / hi`` (``None`` disables the split: pure quantiles).
    """
    if buckets_per_dim < 1:
        raise ValueError(f"buckets_per_dim must be >= 1, got {buckets_per_dim}")
    by_mode: dict[str, dict[Shape, int]] = defaultdict(lambda: defaultdict(int))
    for mode, shape in shapes:
        by_mode[mode][tuple(shape)] += 1
    modes: dict[str, ModeBuckets] = {}
    for mode, counts in sorted(by_mode.items()):
        ndims: dict[int, int] = defaultdict(int)
        for s, c in counts.items():
            ndims[len(s)] += c
        nd = max(sorted(ndims), key=lambda d: ndims[d])  # the mode's usual number of dims
        dims: list[dict[int, int]] = [defaultdict(int) for _ in range(nd)]
        for s, c in counts.items():
            if len(s) == nd:
                w = c * max(1, cost(mode, s))
                for d in range(nd):
                    dims[d][s[d]] += w
        modes[mode] = ModeBuckets(tuple(
            tuple(_dim_bounds(v, buckets_per_dim, exact_max, max_width)) for v in dims))
    return BucketSpec(modes)


def shapes_from_index(path: str) -> Iterable[tuple[str, Shape]]:
    """``(mode, shape)`` of every block of a dataset, from its manifest and shard indexes only."""
    from blocklm.formats import iter_index  # the format issue's index reader

    for _shard, entry in iter_index(path):
        for b in entry.blocks:
            yield b.mode, tuple(b.shape)


def buckets_from_index(path: str, cost: CostFn = default_cost, **kw) -> BucketSpec:
    """:func:`estimate_buckets` over a dataset's shard indexes (no payload is read)."""
    return estimate_buckets(shapes_from_index(path), cost, **kw)
