"""BlockDataset: a PyTorch IterableDataset streaming :class:`Sample`s from block-list shards.

Each pass (epoch) is a pure function of the seed, the epoch and the split: the shard order, each
rank's range, each worker's pieces and the buffer shuffle are computed on positions before any
byte is read (:mod:`.split`, :mod:`.shuffle`). A state therefore only needs the positions already
consumed, which makes resumption exact under any number of DataLoader workers (:mod:`.state`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blocklm.formats.block import Sample
from blocklm.formats.errors import FormatError
from blocklm.formats.limits import DEFAULT_LIMITS, Limits
from blocklm.formats.reader import DatasetShard, Opener

from .buffers import RunBuffers
from .errors import StateError
from .fastpath import IndexCache, compiled_index
from .live import Live as _Live
from .maps import MapCache
from .opener import RemoteOpener, is_remote
from .readahead import ReadAhead
from .shuffle import buffer_order, rng_for
from .sources import RemoteConfig
from .split import EpochPlan, from_intervals, plan_epoch, to_intervals, worker_positions
from .state import LOADER_KEY, STATE_VERSION, check_same, check_workers_unique, extract_states
from .stats import LoaderStats
from .stream import REMOTE_RUN_BYTES, RunReader
from .urls import count_samples, list_shards


@dataclass(frozen=True)
class LoaderConfig:
    """Options of a :class:`BlockDataset` (see its docstring)."""

    shuffle: bool = True
    seed: int = 0
    shuffle_buffer: int = 1000
    piece_samples: int = 256
    on_error: str = "raise"
    verify: bool = True
    rank: int | None = None
    world_size: int | None = None

    def __post_init__(self) -> None:
        if self.on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {self.on_error!r}")
        if self.seed < 0 or self.shuffle_buffer < 0 or self.piece_samples < 1:
            raise ValueError("seed and shuffle_buffer must be >= 0, piece_samples >= 1")


class BlockDataset(IterableDataset):
    """Stream the samples of block-list shards, split across ranks and workers, resumably.

    ``source``: a dataset folder or ``manifest.json``, a ``.tar`` shard, a brace pattern
    (``shards/shard-{000000..000127}.tar``) or a list of these, as local paths or ``file://``,
    ``http(s)://``, ``s3://`` or other fsspec URLs (``remote`` configures timeouts, retries, S3
    endpoint and credentials, the local cache; or pass your own ``opener``).

    Yields :class:`~blocklm.formats.Sample` (payload bytes verified; call ``block.decode()`` for
    content), or ``transform(sample)``. Options: ``shuffle`` (seeded shard order plus a buffer of
    ``shuffle_buffer`` samples; call :meth:`set_epoch` each epoch), ``on_error`` ("raise" a typed
    error naming shard and key, or "skip" and count it in :attr:`stats`), ``rank``/``world_size``
    (default: ``torch.distributed`` when initialised). Every rank gets ``len(dataset)`` samples per
    epoch (see :mod:`blocklm.pipeline.split` for the policy).
    ``index_cache_entries`` bounds the compiled shard indexes kept across epochs (about 2 KB per
    sample, in each process); ``map_cache_bytes`` the local shards kept memory-mapped across
    epochs (:mod:`blocklm.pipeline.maps`; 0: map each shard afresh every pass).

    Resume with :meth:`state_dict`/:meth:`load_state_dict`, or through torchdata's
    ``StatefulDataLoader``; :meth:`load_state_dict` also takes a whole ``StatefulDataLoader`` state,
    to resume under a different number of workers.

    >>> ds = BlockDataset("data/shards/text", seed=1)          # doctest: +SKIP
    >>> ds.set_epoch(0); next(iter(ds)).blocks[0].decode()    # doctest: +SKIP
    """

    def __init__(self, source: str | os.PathLike | Sequence[str | os.PathLike], *, shuffle: bool = True, seed: int = 0,
                 shuffle_buffer: int = 1000, piece_samples: int = 256, on_error: str = "raise",
                 verify: bool = True, rank: int | None = None, world_size: int | None = None,
                 remote: RemoteConfig | None = None, opener: Opener | None = None,
                 transform: Callable[[Sample], Any] | None = None,
                 limits: Limits = DEFAULT_LIMITS, index_cache_entries: int = 1 << 15,
                 map_cache_bytes: int = 1 << 30) -> None:
        super().__init__()
        self._lives: set[_Live] = set()  # passes handing out a chunk (see _Live)
        self.config = LoaderConfig(shuffle, seed, shuffle_buffer, piece_samples, on_error, verify,
                                   rank, world_size)
        self.opener = opener if opener is not None else RemoteOpener(remote)
        self.transform = transform
        self.limits = limits
        self.stats = LoaderStats()
        before = getattr(self.opener, "retries", 0)
        shards = list_shards(source, self.opener, limits)
        skip = self.config.on_error == "skip"
        self.counts = count_samples(shards, self.opener, limits,
                                    on_missing=self._missing_shard if skip else None)
        self.stats.retries += getattr(self.opener, "retries", 0) - before
        self.urls = [s.url for s in shards]
        self.index_xxh3 = [s.index_xxh3 for s in shards]
        self.epoch = 0
        self._pending: list[dict[str, Any]] | None = None
        self._pass: dict[str, Any] | None = None
        self._indexes = IndexCache(index_cache_entries)
        self._maps = MapCache(map_cache_bytes)
        self._buffers = RunBuffers(REMOTE_RUN_BYTES)  # remote runs are received into these
        # by this thread, kept across passes with its connections; ended with the dataset
        self._reads = ReadAhead(getattr(self.opener, "close_thread", None))
        self._passes_this_epoch = 0
        self._next: tuple | None = None  # the plan of the pass expected next (see _expect)
        self._last_epoch: int | None = None

    def __getstate__(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["_passes_this_epoch"] = 0  # a worker's copy counts its own passes
        d["_lives"] = set()
        d["_next"] = None
        return d

    @property
    def stats(self) -> LoaderStats:
        """What this dataset did in this process (:class:`LoaderStats`), up to the last sample
        handed out."""
        for live in self._lives:
            live.sync()
        return self._stats

    @stats.setter
    def stats(self, value: LoaderStats) -> None:
        self._stats = value

    def load_indexes(self) -> int:
        """Load the local shards' indexes now into the cache that every pass reads them from,
        if all fit it (else none: a pass would drop some); how many. A remote one, or one that
        fails (its pass reports it, as before), is left to the first pass. The trainer calls
        it before it freezes the objects alive at the start out of the garbage collector: the
        indexes were built later, and each full collection traversed them (3 objects a sample)."""
        if sum(self.counts) > self._indexes.max_entries:
            return 0
        n = 0
        for url, count, xxh3 in zip(self.urls, self.counts, self.index_xxh3):
            if not is_remote(url):
                try:
                    compiled_index(self._indexes, url, count, xxh3, self.opener, self.limits)
                    n += 1
                except FormatError:
                    pass
        return n

    def _missing_shard(self, shard: DatasetShard, err: FormatError) -> None:
        self.stats.skip(err, shard.url, None)

    @staticmethod
    def mix(datasets: Sequence[BlockDataset], weights: Sequence[float], *, seed: int = 0,
            stop: str = "first") -> Any:
        """A weighted mixture of datasets, deterministic under ``seed``
        (:class:`blocklm.pipeline.mix.MixedDataset`)."""
        from .mix import MixedDataset

        return MixedDataset(datasets, weights, seed=seed, stop=stop)

    # ------------------------------------------------------------------ split and plan

    def rank_world(self) -> tuple[int, int]:
        """``(rank, world_size)``: as given, else from ``torch.distributed``, else ``(0, 1)``."""
        c = self.config
        if c.rank is not None or c.world_size is not None:
            return c.rank or 0, c.world_size or 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def plan(self, epoch: int | None = None) -> EpochPlan:
        """This rank's plan of ``epoch`` (default: the current one)."""
        rank, world = self.rank_world()
        return plan_epoch(self.counts, seed=self.config.seed,
                          epoch=self.epoch if epoch is None else epoch,
                          shuffle=self.config.shuffle, rank=rank, world=world)

    def __len__(self) -> int:
        """Samples per rank per epoch (the same on every rank)."""
        _, world = self.rank_world()
        return sum(self.counts) // world

    def order(self, plan: EpochPlan, done: np.ndarray, workers: int, worker: int,
              epoch: int | None = None) -> np.ndarray:
        """The rank positions worker ``worker`` of ``workers`` yields in ``epoch`` (default: the
        current one), in order, skipping ``done``."""
        c = self.config
        pos = worker_positions(plan.size, done, workers, worker, c.piece_samples)
        if not c.shuffle:
            return pos
        rank, _ = self.rank_world()
        rng = rng_for(c.seed, self.epoch if epoch is None else epoch, rank, workers, worker,
                      int(done.sum()))
        return pos[buffer_order(len(pos), c.shuffle_buffer, rng)]

    # ------------------------------------------------------------------ epochs and state

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (shard order and shuffle change with it). Drops a loaded state of
        another epoch."""
        if self._pending and self._pending[0]["epoch"] != epoch:
            self._pending = None
        if epoch != self.epoch:
            self._pass = None
        self.epoch = int(epoch)
        self._passes_this_epoch = 0

    def _fingerprint(self) -> dict[str, Any]:
        c = self.config
        rank, world = self.rank_world()
        return {"seed": c.seed, "shuffle": c.shuffle, "buffer": c.shuffle_buffer,
                "piece": c.piece_samples, "rank": rank, "world": world,
                "counts": [len(self.counts), sum(self.counts)]}

    def state_dict(self) -> dict[str, Any]:
        """Where this dataset (in this process) stands: see :mod:`blocklm.pipeline.state`."""
        st: dict[str, Any] = {LOADER_KEY: STATE_VERSION, "fingerprint": self._fingerprint(),
                              "epoch": self.epoch, "stats": self.stats.to_dict()}
        if self._pass is not None:
            p = self._pass
            st.update(base=p["base"], workers=p["workers"], worker=p["worker"],
                      yielded=p["yielded"])
        elif self._pending and len(self._pending) == 1:
            p = self._pending[0]
            st.update(base=p["base"], workers=p.get("workers"), worker=p.get("worker"),
                      yielded=p.get("yielded", 0))
        elif self._pending:
            done = self._merge(self._pending, self.plan())
            st.update(base=to_intervals(done), workers=None, worker=None, yielded=0)
        else:
            st.update(base=[], workers=None, worker=None, yielded=0)
        return st

    def load_state_dict(self, state: Any) -> None:
        """Resume from a state of this dataset, a list of worker states, or a (torchdata)
        ``StatefulDataLoader`` state dict; the next pass yields exactly the samples of that epoch
        not yet consumed, under any number of workers."""
        states = extract_states(state, LOADER_KEY)
        if not states:
            return
        fp = check_same(states, "fingerprint")
        if fp != self._fingerprint():
            raise StateError(f"state of another dataset or split: {fp} != {self._fingerprint()}")
        check_workers_unique(states)
        self.epoch = int(check_same(states, "epoch"))
        self._pending = states
        self._pass = None
        self.stats = self.stats_of(states)

    @staticmethod
    def stats_of(state: Any) -> LoaderStats:
        """The stats summed over every worker in a ``state_dict`` (of this dataset or of a
        ``StatefulDataLoader``): with DataLoader workers, each worker counts in its own process
        and the main process's :attr:`stats` stays untouched, so read them from here."""
        total = LoaderStats()
        for s in extract_states(state, LOADER_KEY):
            total = total.add(LoaderStats.from_dict(s.get("stats", {})))
        return total

    def _merge(self, states: list[dict[str, Any]], plan: EpochPlan) -> np.ndarray:
        """The mask of positions consumed according to ``states`` (all of one pass)."""
        done = np.zeros(plan.size, dtype=bool)
        for s in states:
            base = from_intervals(s.get("base", []), plan.size)
            done |= base
            k = int(s.get("yielded") or 0)
            if s.get("workers") is not None and k:
                done[self.order(plan, base, s["workers"], s["worker"])[:k]] = True
        return done

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        self._passes_this_epoch += 1
        if info is not None and self._passes_this_epoch > 1:
            warnings.warn("BlockDataset: a DataLoader worker starts a second pass of epoch "
                          f"{self.epoch}: with persistent_workers=True, set_epoch() in the main "
                          "process does not reach the workers; use persistent_workers=False",
                          stacklevel=2)
        pending, self._pending = self._pending, None
        # the plan worked out ahead by the previous pass (see _expect), if this is that pass
        ready, self._next = self._next, None
        if ready is None or pending or ready[0] != (self.epoch, workers, worker,
                                                     self.rank_world()):
            ready = None
        plan = self.plan() if ready is None else ready[1]
        skip = 0
        if pending and len(pending) == 1 and pending[0].get("workers") == workers \
                and pending[0].get("worker") == worker:
            done = from_intervals(pending[0]["base"], plan.size)
            skip = int(pending[0].get("yielded") or 0)
        elif pending:
            done = self._merge(pending, plan)
            if worker != 0:  # the merged stats travel with worker 0 only: no double counting
                self.stats = LoaderStats()
        else:
            done = np.zeros(plan.size, dtype=bool)
        if ready is None:
            emit = self.order(plan, done, workers, worker)[skip:]
            needed = np.sort(emit) if self.config.shuffle else emit
            located = plan.locate(needed)
        else:
            emit, needed, located = ready[2:]
        self._pass = {"base": to_intervals(done), "workers": workers, "worker": worker,
                      "yielded": skip}
        # in the main process, the pass after this one is expected to be of the same epoch if
        # this one repeated the last pass's epoch, else of the next (set_epoch before each)
        last, self._last_epoch = self._last_epoch, self.epoch
        after = None
        if info is None:
            after = self._expect(self.epoch if last == self.epoch else self.epoch + 1)
        return self._run(emit, needed, located, after)

    def _expect(self, epoch: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
        """Called by the reader once a pass's reads are all queued: the plan of a pass of
        ``epoch`` (kept for that pass, if it comes next), whose first request is sent ahead so
        that its first bytes are here when it starts (a new request's first bytes are the
        pass's longest wait over loopback: 1-2 ms of a 5-10 ms pass)."""
        workers, worker, rw = 1, 0, self.rank_world()

        def after() -> tuple[np.ndarray, np.ndarray]:
            plan = self.plan(epoch)
            emit = self.order(plan, np.zeros(plan.size, dtype=bool), workers, worker, epoch)
            needed = np.sort(emit) if self.config.shuffle else emit
            located = plan.locate(needed)
            self._next = ((epoch, workers, worker, rw), plan, emit, needed, located)
            return located
        return after

    def _run(self, emit: np.ndarray, needed: np.ndarray,
             located: tuple[np.ndarray, np.ndarray],
             after: Callable[[], tuple[np.ndarray, np.ndarray]] | None) -> Iterator[Any]:
        shards, local = located
        reader = RunReader(self.urls, self.counts, self.index_xxh3, opener=self.opener,
                           limits=self.limits, verify=self.config.verify, stats=self._stats,
                           indexes=self._indexes, maps=self._maps,
                           buffers=self._buffers, reads=self._reads, after=after)
        chunks = reader.chunks(shards, local)
        stream = (_reorder(chunks, needed.tolist(), emit.tolist()) if self.config.shuffle
                  else chunks)
        p, stats, transform = self._pass, self._stats, self.transform
        raise_errors = self.config.on_error == "raise"
        live = _Live(p, stats)
        self._lives.add(live)
        try:
            for _, items in stream:
                live.sync()  # the previous chunk, all of it consumed
                if not any(map(isinstance, items, repeat(FormatError))):
                    # handed out by the list's own iterator: no bytecode of ours per sample.
                    # The counts follow the iterator (a state or stats read now syncs them).
                    live.start(items)
                    yield from live.it if transform is None else map(transform, live.it)
                    continue
                for s in items:
                    if s.__class__ is not Sample and isinstance(s, FormatError):
                        if raise_errors:
                            raise s
                        p["yielded"] += 1
                        stats.skip(s, s.shard, s.key)
                        continue
                    p["yielded"] += 1  # counted before the yield: a state taken now includes it
                    stats.samples += 1
                    yield s if transform is None else transform(s)
        finally:
            live.sync()
            self._lives.discard(live)
            stream.close()
            chunks.close()  # stops the read-ahead thread before the sources close
            reader.close()


def _reorder(chunks: Iterator[tuple[int, list[Any]]], needed: list[int], emit: list[int],
             ) -> Iterator[tuple[None, list[Any]]]:
    """The items of ``chunks`` (of the ascending positions ``needed``) in the order ``emit``,
    one at a time, holding only those read ahead (at most the shuffle buffer, by construction of
    the buffer order, plus one chunk)."""
    held: dict[int, Any] = {}
    for pos in emit:
        while pos not in held:
            c, items = next(chunks)
            held.update(zip(needed[c:c + len(items)], items))
        yield None, [held.pop(pos)]
