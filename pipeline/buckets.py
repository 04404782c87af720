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
``max_width`` (relative: ``(hi - lo) / hi``) so that padding inside a bucket stays small, and
finally merges buckets too rare to fill a batch within the TTL into the bucket where they add the
least padding (``ModeBuckets.merge``).
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
    """Bucket boundaries of one mode: a sorted tuple of inclusive upper bounds per dimension, and
    ``merge``: ``(cell, into)`` pairs that send a rare grid cell's shapes to another cell."""

    bounds: tuple[tuple[int, ...], ...] | None
    merge: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.bounds is not None:
            b = tuple(tuple(int(v) for v in dim) for dim in self.bounds)
            for dim in b:
                if list(dim) != sorted(set(dim)):
                    raise ValueError(f"bucket bounds must be strictly increasing, got {dim}")
            object.__setattr__(self, "bounds", b)
        merge = tuple((tuple(int(v) for v in a), tuple(int(v) for v in t)) for a, t in self.merge)
        object.__setattr__(self, "merge", merge)
        object.__setattr__(self, "_remap", dict(merge))

    def key(self, shape: Shape) -> tuple[int, ...]:
        """The bucket of ``shape`` (see the module docstring)."""
        b = self.bounds
        if b is None or len(shape) != len(b):
            return (-1 - len(shape),)
        k = tuple([bisect_left(d, s) for d, s in zip(b, shape)])
        return self._remap.get(k, k)  # type: ignore[attr-defined]


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
        """``{mode: {"bounds": [[...] per dim] or null, "merge": [[cell, into], ...]}}``."""
        return {m: {"bounds": None if b.bounds is None else [list(d) for d in b.bounds],
                    "merge": [[list(a), list(t)] for a, t in b.merge]}
                for m, b in sorted(self.modes.items())}

    @classmethod
    def from_json(cls, obj: Mapping) -> BucketSpec:
        """Inverse of :meth:`to_json`; a mode may also be given as a plain list of bounds."""
        modes = {}
        for m, v in obj.items():
            if isinstance(v, Mapping):
                b = v.get("bounds")
                modes[m] = ModeBuckets(None if b is None else tuple(tuple(d) for d in b),
                                       tuple((tuple(a), tuple(t)) for a, t in v.get("merge", ())))
            else:
                modes[m] = ModeBuckets(None if v is None else tuple(tuple(d) for d in v))
        return cls(modes)

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


def _emax(a: Shape, b: Shape) -> Shape:
    return tuple(map(max, a, b))


def _merge_rare(mode: str, mb: ModeBuckets, counts: Mapping[Shape, int], cost: CostFn,
                min_cost: float, max_pad: float) -> ModeBuckets:
    """Merge grid cells holding less than ``min_cost`` tokens into the cell where they add the
    least padding (estimated against the cells' largest shapes), while the merged cell's
    estimated padding stays within ``max_pad``. Rarest cell first; deterministic."""
    cells: dict[tuple, list] = {}  # key -> [requests, tokens, largest shape, grid keys]
    for s, c in counts.items():
        k = mb.key(s)
        if k[0] < 0:
            continue
        cell = cells.setdefault(k, [0, 0, s, [k]])
        cell[0] += c
        cell[1] += c * max(1, cost(mode, s))
        cell[2] = _emax(cell[2], s)
    merge: list[tuple[tuple, tuple]] = []
    stuck: set[tuple] = set()
    while True:
        rare = sorted((v[1], k) for k, v in cells.items() if v[1] < min_cost and k not in stuck)
        if not rare or len(cells) < 2:
            break
        _, k = rare[0]
        n, tok, up, keys = cells[k]
        best = None
        for t, (n2, tok2, up2, _) in sorted(cells.items()):
            if t == k:
                continue
            u = _emax(up, up2)
            padded = (n + n2) * max(1, cost(mode, u))
            if (padded - tok - tok2) > max_pad * padded:
                continue
            delta = padded - n * max(1, cost(mode, up)) - n2 * max(1, cost(mode, up2))
            if best is None or delta < best[0]:
                best = (delta, t, u)
        if best is None:
            stuck.add(k)
            continue
        _, t, u = best
        cell = cells.pop(k)
        target = cells[t]
        target[0] += cell[0]
        target[1] += cell[1]
        target[2] = u
        target[3] += cell[3]
    for t, (_, _, _, keys) in sorted(cells.items()):
        merge += [(k, t) for k in keys if k != t]
    return ModeBuckets(mb.bounds, tuple(sorted(merge)))


def estimate_buckets(
    shapes: Iterable[tuple[str, Shape]],
    cost: CostFn = default_cost,
    *,
    buckets_per_dim: int = 16,
    exact_max: int = 16,
    max_width: float | None | Mapping[str, float | None] = 0.06,
    min_share: float = 0.002,
    max_merge_pad: float = 0.05,
) -> BucketSpec:
    """Bucket boundaries from ``(mode, shape)`` pairs (see the module docstring).

    ``buckets_per_dim`` cost-weighted quantiles per dimension (before splitting), used when a
    dimension has more than ``exact_max`` distinct values; ``max_width`` caps a bucket's
    relative width ``(hi - lo) / hi`` (``None`` disables the split: pure quantiles); a mapping
    gives it per mode (modes not in it: ``None``), e.g. narrow audio buckets for coalescing
    (``DispatchConfig.coalesce_tokens``) next to text's plain quantiles.

    Then every bucket holding less than ``min_share`` of all tokens (all modes together) is
    merged into the bucket where it adds the least padding, unless that would pad the merged
    bucket by more than ``max_merge_pad`` (estimated against its largest shape). Why: every mode
    shares the dispatcher's steps, about one budget of tokens per step, so a bucket with share
    ``f`` fills a batch about every ``1/f`` steps; with a TTL of ``T`` steps, buckets with
    ``f < 1/T`` would mostly run forced by the TTL. The default 0.002 suits a TTL of about 1000 steps
    (``min_share=0`` disables merging).
    """
    if buckets_per_dim < 1:
        raise ValueError(f"buckets_per_dim must be >= 1, got {buckets_per_dim}")
    by_mode: dict[str, dict[Shape, int]] = defaultdict(lambda: defaultdict(int))
    for mode, shape in shapes:
        by_mode[mode][tuple(shape)] += 1
    total = sum(c * max(1, cost(m, s)) for m, counts in by_mode.items()
                for s, c in counts.items())
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
        width = max_width.get(mode) if isinstance(max_width, Mapping) else max_width
        mb = ModeBuckets(tuple(
            tuple(_dim_bounds(v, buckets_per_dim, exact_max, width)) for v in dims))
        if min_share > 0:
            mb = _merge_rare(mode, mb, counts, cost, min_share * total, max_merge_pad)
        modes[mode] = mb
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
