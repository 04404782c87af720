"""Reading planned samples: one range read per run of neighbouring samples, errors as values.

:class:`RunReader` turns a sorted list of ``(position, shard, index in shard)`` into
``(position, Sample | FormatError)`` in the same order. Neighbouring samples of a shard are read
with one ``ByteSource.read`` (up to ``run_bytes``; a local shard is memory-mapped instead; an
HTTP shard is received into a reused buffer, :mod:`.buffers`, one request serving a whole
stretch of neighbouring runs, the next stretch's request sent ahead, and the first run of the
pass expected next read after this pass's last), then cut into samples by :class:`~.fastpath.FastDecoder` (checksums verified; anything unexpected goes
to the format's :class:`~blocklm.formats.reader.BlockDecoder`). A failure is returned in place
of each sample it affects, named by shard and key, so the caller decides to raise or skip.
"""

from __future__ import annotations

import mmap
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from concurrent.futures import wait as _wait
from time import sleep as _sleep

import numpy as np

from blocklm.formats.block import Sample
from blocklm.formats.errors import FormatError, TruncatedShardError
from blocklm.formats.limits import Limits
from blocklm.formats.reader import RUN_BYTES, BlockDecoder, ByteSource, LocalSource, Opener

from .buffers import RunBuffers
from .errors import SourceError
from .fastpath import FastDecoder, IndexCache, compiled_index
from .maps import MapCache
from .opener import is_remote
from .readahead import ReadAhead, fetch_run, next_request, pairs
from .sources import HTTPSource
from .stats import LoaderStats

OPEN_SHARDS = 4  # indexes and sources kept open per process (LRU): bounds memory over epochs
READ_AHEAD = 1  # runs fetched ahead of the one being decoded
CHUNK = 64  # samples cut and handed over at a time
# remote runs are read in ranges of at most this: the first run arrives sooner, the read-ahead
# overlaps the cutting in finer steps, and the body is still in the CPU caches when it is cut
# (measured over loopback nginx, one request per run: 2 MiB beat 1, 4 and 8 MiB on text and audio;
# with one request per stretch of runs 1, 2 and 4 MiB were within noise)
REMOTE_RUN_BYTES = 2 << 20
# a remote request asks for the neighbouring runs of up to this many bytes at once: each run is
# then received from the answer already under way, with no request or round trip of its own
STREAM_BYTES = 64 << 20
# the first run of a request is this short, so that cutting starts sooner (a pass's first run is
# not overlapped with anything)
FIRST_RUN_BYTES = 256 << 10
BULK_MIN = 8  # shorter runs are cut sample by sample (the bulk cut's numpy calls cost ~3 us)


def _map_run(o: _Open, start: int, end: int) -> tuple[mmap.mmap, memoryview]:
    """A local shard's mapping, checked to hold bytes ``[start, end)`` (the index's offsets are
    untrusted until checked against the file's size), their page tables filled in one call."""
    try:
        mapped = o.source.mapped()
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot map the file: {e}", shard=o.url) from None
    have = 0 if mapped is None else len(mapped[0])
    if end > have:
        raise TruncatedShardError(f"wanted {end - start} bytes at offset {start}, file has "
                                  f"{have} bytes", shard=o.url)
    o.source.populate(start, end)
    return mapped


def with_key(err: FormatError, shard: str, key: str | None) -> FormatError:
    """``err`` re-made to name ``shard`` and ``key`` (same type and reason)."""
    if err.key == key and err.shard is not None:
        return err
    out = type(err)(err.reason, shard=err.shard or shard, key=key, block=err.block)
    out.__cause__ = err
    return out


class _Open:
    __slots__ = ("url", "entries", "offs", "ends", "source", "decoder", "error", "mapped", "into")

    def __init__(self, url: str, entries: list | None, source: ByteSource | None,
                 decoder: FastDecoder | None, error: FormatError | None) -> None:
        self.url, self.entries, self.source, self.decoder = url, entries, source, decoder
        self.error = error
        comp = decoder.shard if decoder is not None else None
        self.offs, self.ends = (comp.offs, comp.ends) if comp is not None else ([], [])
        # a plain local file is mapped, not read; a subclass that changes read() (to count or
        # filter bytes) is read through it, never bypassed
        self.mapped = (isinstance(source, LocalSource) and type(source).read is LocalSource.read
                       and "read" not in vars(source))
        # an HTTP source fills reused buffers (``readinto``), unless read() is changed likewise
        self.into = (isinstance(source, HTTPSource) and type(source).read is HTTPSource.read
                     and not {"read", "readinto"} & vars(source).keys())


class RunReader:
    """Reads samples of a list of shards by position, counting bytes and retries in ``stats``."""

    def __init__(self, urls: list[str], counts: list[int], index_xxh3: list[str | None], *,
                 opener: Opener, limits: Limits, verify: bool, stats: LoaderStats,
                 indexes: IndexCache | None = None, maps: MapCache | None = None,
                 run_bytes: int = RUN_BYTES, remote_run_bytes: int = REMOTE_RUN_BYTES,
                 buffers: RunBuffers | None = None, reads: ReadAhead | None = None,
                 after: Callable[[], tuple[np.ndarray, np.ndarray] | None] | None = None,
                 ) -> None:
        self.urls, self.counts, self.index_xxh3 = urls, counts, index_xxh3
        self.opener, self.limits, self.verify = opener, limits, verify
        self.stats = stats
        self.run_bytes = run_bytes
        self.remote_run_bytes = min(run_bytes, remote_run_bytes)
        self.indexes = indexes if indexes is not None else IndexCache()
        self.maps = maps if maps is not None else MapCache(0)
        if buffers is None or buffers.size != self.remote_run_bytes:
            buffers = RunBuffers(self.remote_run_bytes)
        self.buffers = buffers  # for remote runs (the dataset's: kept across passes)
        # the read-ahead thread: the dataset's, kept across passes, else one for this reader
        self._own_reads = reads is None
        self.reads = reads if reads is not None else ReadAhead(getattr(opener, "close_thread",
                                                                       None))
        self._open: OrderedDict[int, _Open] = OrderedDict()
        # the plan ``(shards, local)`` of the pass expected next, asked for once this pass's
        # reads are all queued: its first request is sent ahead (see :meth:`_submit`)
        self.after = after
        self._last: tuple[_Open, int] | None = None  # shard and request end of the last run

    def shard(self, s: int) -> _Open:
        """Index, source and decoder of shard ``s`` (or the error that stops it being read)."""
        o = self._open.get(s)
        if o is not None:
            self._open.move_to_end(s)
            return o
        url = self.urls[s]
        try:
            comp = compiled_index(self.indexes, url, self.counts[s], self.index_xxh3[s],
                                  self.opener, self.limits)
            dec = BlockDecoder(url, verify=self.verify, limits=self.limits)
            src = self.maps.get(url)
            if src is None:
                src = self.opener(url)
            o = _Open(url, comp.entries, src, FastDecoder(comp, dec), None)
            # only local shards stay mapped: a remote shard's cached copy belongs to its cache's
            # LRU (a mapping would pin an evicted file's disk space)
            if o.mapped and not is_remote(url) and url not in self.maps:
                try:
                    self.maps.put(url, src)  # the cache closes it when it drops it
                except FormatError:
                    pass  # unreadable: the read raises again, naming each sample's key
        except FormatError as e:
            o = _Open(url, None, None, None, e)
        self._open[s] = o
        while len(self._open) > OPEN_SHARDS:
            _, old = self._open.popitem(last=False)
            self._close(old)
        return o

    def _close(self, o: _Open) -> None:
        """Close the source of ``o`` unless the map cache keeps it for the next pass."""
        close = getattr(o.source, "close", None)
        if close is not None and self.maps.get(o.url) is not o.source:
            close()

    def runs(self, shards: np.ndarray, local: np.ndarray,
             ) -> Iterator[tuple[int, int, _Open, int, int, int, int]]:
        """``(i, j, shard, start, end, l, until)``: plan entries ``i..j-1`` are samples
        ``l, l+1, ...`` of one shard, in bytes ``[start, end)`` of it (``start == end == -1``
        when the shard cannot be read; its samples need not be consecutive then), and the runs
        that follow go on without a gap up to byte ``until`` (the end of one remote request).
        Computed per stretch of consecutive samples, not per sample: a run ends where the
        stretch does or where the next sample would take it past ``run_bytes`` (found by
        bisecting the index's end offsets, which the index guarantees ascending)."""
        n = len(shards)
        if n == 0:
            return
        cut = np.flatnonzero((shards[1:] != shards[:-1]) | (local[1:] != local[:-1] + 1)) + 1
        bounds = [0, *cut.tolist(), n]
        sh = shards[bounds[:-1]].tolist()
        first = local[bounds[:-1]].tolist()
        g = 0
        while g < len(sh):
            s, a = sh[g], bounds[g]
            o = self.shard(s)
            if o.error is not None:  # every following stretch of the same shard at once
                while g + 1 < len(sh) and sh[g + 1] == s:
                    g += 1
                yield a, bounds[g + 1], o, -1, -1, -1, -1
                g += 1
                continue
            b, lo = bounds[g + 1], first[g]
            hi = lo + (b - a)
            offs, ends = o.offs, o.ends
            run_bytes = self.run_bytes if o.mapped else self.remote_run_bytes
            until = -1
            while lo < hi:
                start = offs[lo]
                size = FIRST_RUN_BYTES if start >= until and o.into else run_bytes
                m = bisect_right(ends, start + size, lo + 1, hi)
                if start >= until:  # a new request: for the runs of up to STREAM_BYTES
                    until = ends[bisect_right(ends, start + STREAM_BYTES, m, hi) - 1]
                yield a, a + (m - lo), o, start, ends[m - 1], lo, until
                a, lo = a + (m - lo), m
            g += 1

    def read(self, positions: list[int], shards: list[int] | np.ndarray,
             local: list[int] | np.ndarray) -> Iterator[tuple[int, Sample | FormatError]]:
        """``(position, sample or error)`` for each planned sample, in the given order."""
        for c, out in self.chunks(shards, local):
            yield from zip(positions[c:c + len(out)], out)

    def chunks(self, shards: list[int] | np.ndarray, local: list[int] | np.ndarray,
               ) -> Iterator[tuple[int, list[Sample | FormatError]]]:
        """``(c, items)``: the samples (or errors) of plan entries ``c, c+1, ...`` (entry ``k``
        is sample ``local[k]`` of shard ``shards[k]``), in order, in lists of at most ``CHUNK``
        (a list is far cheaper to hand over than one generator step per sample).

        Samples are cut from a run a chunk at a time as they are asked for, in bulk where the
        chunk allows (:mod:`.bulk`), else one by one. A local shard is
        mapped (large payloads handed out as views, no copy, no thread: there is no I/O to
        overlap). For a remote shard a helper thread (the dataset's :class:`ReadAhead`) reads
        the next run while this one is cut (the read releases the GIL; cutting in the helper too
        would only contend for it), so at most ``1 + READ_AHEAD`` runs are in flight. HTTP runs
        arrive in buffers of the pool ``buffers`` and are cut like mapped ones (large payloads
        as views where they make up half the run or more), a buffer given back once cut. Before
        the last run of a request is received, the next request is sent (its answer comes
        meanwhile); after the last run of the pass, the first run of the pass ``after()`` plans
        is read and kept in ``reads`` for that pass."""
        shards = np.asarray(shards, dtype=np.int64)
        local = np.asarray(local, dtype=np.int64)
        retries0, opener0 = self.stats.retries, self._retries()
        runs = pairs(self.runs(shards, local))
        ahead: deque = deque()
        pool = self.reads
        bufs = self.buffers
        try:
            for _ in range(1 + READ_AHEAD):
                self._submit(pool, runs, ahead, bufs)
            while ahead:
                (i, j, o, start, end, lo, _), fut = ahead.popleft()
                self._submit(pool, runs, ahead, bufs)
                url = o.url
                err: FormatError | None = o.error
                if err is None:
                    try:
                        if fut is None:
                            buf, mv = _map_run(o, start, end)
                            base, views = 0, True
                        else:
                            buf = fut.result()
                            mv, base = memoryview(buf)[:end - start], start
                            # views of the buffer (no copy, no fresh pages per payload) where
                            # they make up half the run or more: a view keeps its whole buffer
                            # from reuse, so little payload never holds much buffer
                            vcum = o.decoder.shard.vcum
                            views = (buf.__class__ is mmap.mmap
                                     and 2 * int(vcum[lo + j - i] - vcum[lo]) >= end - start)
                    except FormatError as e:
                        err = e
                self.stats.retries = retries0 + self._retries() - opener0
                if err is not None:
                    keys = ([o.entries[li].key for li in local[i:j].tolist()]
                            if o.entries is not None else [None] * (j - i))
                    yield i, [with_key(err, url, key) for key in keys]
                    continue
                self.stats.bytes += end - start
                sample = o.decoder.sample
                bulk = o.decoder.bulk() if j - i >= BULK_MIN else None
                arr = None if bulk is None else np.frombuffer(mv, dtype=np.uint8)
                for c in range(i, j, CHUNK):
                    # a run's samples are consecutive in their shard: lo, lo + 1, ...
                    l0 = lo + (c - i)
                    l1 = l0 + min(CHUNK, j - c)
                    out = None
                    if bulk is not None and l1 - l0 >= BULK_MIN and bulk.usable(l0, l1, views):
                        out = bulk.cut(l0, l1, buf, arr, base)
                    if out is None:
                        try:
                            out = [sample(li, buf, mv, base, views) for li in range(l0, l1)]
                        except FormatError:  # cut again one by one: each error takes its place
                            out = [self._one(o, li, buf, mv, base, views) for li in range(l0, l1)]
                    if ahead and ahead[0][1] is not None and not ahead[0][1].done():
                        # a read is in flight: let its thread take the GIL now, if it waits for
                        # it, rather than after the 5 ms switch interval (each of its socket calls
                        # needs the GIL back; cutting holds it without pause)
                        _sleep(0)
                    yield c, out
                if fut is not None and buf.__class__ is mmap.mmap:
                    bufs.give(buf)  # cut: no sample points into it
                del buf, mv, arr
        finally:
            # reads not started are not needed any more; one under way is waited for, so no
            # read of this pass is left running when it ends
            futs = [fut for _, fut in ahead if fut is not None and not fut.cancel()]
            _wait(futs)
            self.stats.retries = retries0 + self._retries() - opener0

    @staticmethod
    def _one(o: _Open, li: int, buf: bytes, mv: memoryview, base: int, views: bool,
             ) -> Sample | FormatError:
        try:
            return o.decoder.sample(li, buf, mv, base, views)
        except FormatError as e:
            return with_key(e, o.url, o.entries[li].key)

    def _submit(self, pool: ReadAhead, runs: Iterator, ahead: deque, bufs: RunBuffers) -> None:
        run, nxt = next(runs, (None, None))
        if run is None:
            return
        o, start, end = run[2], run[3], run[4]
        fut = None
        if o.error is None and not o.mapped:
            first = self._last != (o, run[6])  # the first run of its request
            if self._last is None:  # this pass's first read: was it read after the last pass?
                fut = pool.take_early((o.url, start, end, run[6]))
                fut = fut if o.into else None
            if fut is None:
                # sources that fill a buffer (HTTP) get a reused one; others return bytes
                buf = bufs.take(end - start) if o.into else None
                # the last run of its request: the next request is sent before this run is
                # received, so that its answer is under way when it is wanted
                fut = pool.submit(fetch_run, o, start, end, run[6], buf,
                                  next_request(nxt) if o.into and end >= run[6] else None,
                                  first)
            self._last = (o, run[6])
        ahead.append((run, fut))
        if nxt is None and self.after is not None:
            # this pass's reads are all queued: the first run of the pass expected next is
            # read once they are done, and kept for that pass (dropped by any other)
            plan, self.after = self.after(), None
            r = next(self.runs(*plan), None) if plan is not None else None
            if next_request(r) is not None:
                o, start, end, until = r[2], r[3], r[4], r[6]
                buf = bufs.take(end - start)
                pool.keep_early((o.url, start, end, until),
                                pool.submit(fetch_run, o, start, end, until, buf), buf)

    def _retries(self) -> int:
        """Retries so far of the opener's sources (0 for openers that do not count them)."""
        return getattr(self.opener, "retries", 0)

    def close(self) -> None:
        if self._own_reads:
            self.reads.stop()
        for o in self._open.values():
            self._close(o)
        self._open.clear()
