"""``blocktool verify``: read every payload, check every checksum, decode every block against its
declared shape. Each problem is reported as ``Problem(shard, key, block, reason)``."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from dataclasses import dataclass

from blocklm.formats import FormatError, ShardReader, read_manifest, resolve_dataset

from .dataset_open import opener_for


@dataclass
class Problem:
    """One thing wrong: where (shard, sample key, block index) and what."""

    shard: str
    key: str | None
    block: int | None
    reason: str

    def line(self) -> str:
        return (f"{self.shard}\t{self.key if self.key is not None else '-'}\t"
                f"{'block ' + str(self.block) if self.block is not None else '-'}\t{self.reason}")


def _problem(shard: str, e: Exception, key: str | None = None, block: int | None = None) -> Problem:
    if isinstance(e, FormatError):
        return Problem(shard, e.key if e.key is not None else key,
                       e.block if e.block is not None else block, e.reason)
    return Problem(shard, key, block, f"{type(e).__name__}: {e}")


def verify_shard(args: tuple[str, str | None, int | None]) -> tuple[int, int, list[Problem]]:
    """(samples checked, blocks checked, problems) of one shard."""
    shard, index_xxh3, expect_samples = args
    opener = opener_for(shard)
    problems: list[Problem] = []
    try:
        r = ShardReader(shard, opener=opener, index_xxh3=index_xxh3)
        size = r.source.size()
    except (FormatError, OSError) as e:
        return 0, 0, [_problem(shard, e)]
    if size != r.index.shard_bytes:
        problems.append(Problem(shard, None, None, f"shard has {size} bytes, index says "
                                                   f"{r.index.shard_bytes}"))
    if expect_samples is not None and len(r) != expect_samples:
        problems.append(Problem(shard, None, None, f"index lists {len(r)} samples, manifest "
                                                   f"says {expect_samples}"))
    nblocks = 0
    for i, entry in enumerate(r.index.samples):
        try:
            sample = r[i]
        except (FormatError, OSError) as e:
            problems.append(_problem(shard, e, entry.key))
            continue
        for j, b in enumerate(sample.blocks):
            nblocks += 1
            try:
                b.decode()
            except (FormatError, OSError, ValueError) as e:
                problems.append(_problem(shard, e, entry.key, j))
    return len(r), nblocks, problems


@dataclass
class VerifyResult:
    shards: int = 0
    samples: int = 0
    blocks: int = 0
    problems: list[Problem] | None = None


def iter_verify(path: str, workers: int = 1) -> Iterator[tuple[int, int, list[Problem]]]:
    """Per shard, in order: (samples, blocks, problems); shards are checked in parallel."""
    opener = opener_for(path)
    try:
        shards = resolve_dataset(path, opener=opener)
        counts = {}
        if not path.endswith(".tar"):
            m = read_manifest(path, opener=opener)
            counts = {s.shard: s.samples for s in m.shards}
    except (FormatError, OSError) as e:
        yield 0, 0, [_problem(path, e)]
        return
    jobs = [(s.url, s.index_xxh3, counts.get(s.url.rpartition("/")[2])) for s in shards]
    if workers <= 1 or len(jobs) <= 1:
        yield from map(verify_shard, jobs)
        return
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ctx.Pool(min(workers, len(jobs))) as pool:
        yield from pool.imap(verify_shard, jobs)


def verify_dataset(path: str, workers: int = 1) -> VerifyResult:
    """Check the whole dataset; ``problems`` is empty when it is clean."""
    res = VerifyResult(problems=[])
    for n, nb, probs in iter_verify(path, workers):
        res.shards += 1
        res.samples += n
        res.blocks += nb
        res.problems.extend(probs)
    return res
