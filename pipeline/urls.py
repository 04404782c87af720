"""Turning a loader's ``source`` into a list of shards with sample counts.

A source is a dataset folder or ``manifest.json`` (local path, ``file://``, ``http(s)://``,
``s3://`` or any fsspec URL), a single ``.tar`` shard, a brace pattern
(``shards/shard-{000000..000127}.tar``, ``{a,b}`` lists too), or a list of any of these.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence

from blocklm.formats.errors import FormatError
from blocklm.formats.index import ShardIndex
from blocklm.formats.limits import DEFAULT_LIMITS, Limits
from blocklm.formats.reader import DatasetShard, Opener, load_index, resolve_dataset

from .errors import NotFoundError, SourceError

MAX_EXPANSION = 1_000_000  # a brace pattern never expands to more names than this
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar a-001.tar a-002.tar``; ``{x,y}`` lists; nested left
    to right. Numeric ranges keep the zero padding of the first bound."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = int(r.group(1)), int(r.group(2))
        if b < a or b - a >= MAX_EXPANSION:
            raise ValueError(f"bad range {{{body}}} in {pattern!r}")
        width = len(r.group(1))
        items = [f"{i:0{width}d}" for i in range(a, b + 1)]
    else:
        items = body.split(",")
    out: list[str] = []
    for it in items:
        out.extend(expand_braces(pattern[:m.start()] + it + pattern[m.end():]))
        if len(out) > MAX_EXPANSION:
            raise ValueError(f"{pattern!r} expands to more than {MAX_EXPANSION} names")
    return out


def list_shards(source: str | os.PathLike | Sequence[str | os.PathLike], opener: Opener,
                limits: Limits = DEFAULT_LIMITS) -> list[DatasetShard]:
    """The shards of ``source`` in order (counts filled from the manifest where there is one)."""
    items = [str(source)] if isinstance(source, (str, os.PathLike)) else [str(s) for s in source]
    out: list[DatasetShard] = []
    for item in items:
        for name in expand_braces(str(item)):
            if name.endswith(".tar"):
                out.append(DatasetShard(name))
            else:
                out.extend(resolve_dataset(name.rstrip("/"), opener=opener, limits=limits))
    if not out:
        raise FormatError(f"source {source!r} names no shards")
    return out


def load_index_typed(url: str, **kw) -> ShardIndex:
    """``load_index``, with the ``OSError`` its scan fallback can raise (``LocalSource.open`` of a
    missing shard) turned into a :class:`NotFoundError`/:class:`SourceError` naming the shard."""
    try:
        return load_index(url, **kw)
    except FileNotFoundError as e:
        raise NotFoundError(f"cannot open: {e.strerror}", shard=url) from None
    except OSError as e:
        raise SourceError(f"cannot read: {e}", shard=url) from None


def count_samples(shards: list[DatasetShard], opener: Opener, limits: Limits,
                  on_missing: Callable[[DatasetShard, FormatError], None] | None = None,
                  ) -> list[int]:
    """Samples per shard: from the manifest, else from the shard's index (fetched once).

    A shard whose index cannot be read raises, or with ``on_missing`` is reported to it and
    counted as 0 samples (the loader's ``on_error="skip"``)."""
    counts = []
    for s in shards:
        if s.samples is not None:
            counts.append(s.samples)
            continue
        try:
            counts.append(len(load_index_typed(s.url, opener=opener, limits=limits,
                                               expect_xxh3=s.index_xxh3).samples))
        except FormatError as e:
            if on_missing is None:
                raise
            on_missing(s, e)
            counts.append(0)
    return counts
