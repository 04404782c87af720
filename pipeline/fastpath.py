"""A faster per-sample path that yields exactly the Samples of the format's ``BlockDecoder``.

The format's :meth:`BlockDecoder.sample` rebuilds member names and parses tar headers for every
sample; at tens of thousands of samples per second that Python work is the bottleneck. Here each
index entry is compiled once (member names and size fields as bytes) and a sample is checked by
comparing those bytes in place, verifying the payload checksum and checking zstd frames (left
compressed until used, as the format's decoder leaves them), with the same
checks in the same order. Any check that does not pass here hands the sample to the format's
decoder, which raises its own typed error (or returns the sample, when a header is merely written
differently from what this writer produces): results and errors are identical by construction.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import xxhash
import zstandard

from blocklm.formats.block import Block, Sample
from blocklm.formats.errors import IndexMismatchError
from blocklm.formats.index import IndexEntry
from blocklm.formats.lazy import StoredBlock, ViewBlock
from blocklm.formats.limits import Limits
from blocklm.formats.reader import BlockDecoder, Opener
from blocklm.formats.tar import BLOCK
from blocklm.formats.writer import header_member, payload_member

from .bulk import BulkShard
from .urls import load_index_typed

_new = object.__new__
_xxh3 = xxhash.xxh3_64_intdigest  # an int compares faster than a 16-digit string
_frame_size = zstandard.frame_content_size


def _name_field(name: str) -> bytes:
    enc = name.encode("ascii")
    return enc + b"\0" if len(enc) < 100 else enc


def _digest(hexdigest: str) -> int:
    """The recorded checksum as ``xxh3_64_intdigest`` gives it; -1 (never equal, so the format's
    decoder reports it) if it is not 16 hex digits."""
    try:
        return int(hexdigest, 16) if len(hexdigest) == 16 else -1
    except ValueError:
        return -1


def _size_field(n: int) -> bytes:
    return b"%011o\0" % n  # what tarfile writes for ustar sizes below 8 GiB


VIEW_MIN = 16 << 10  # mapped payloads from this size are handed out as views, not copied


class CompiledShard:
    """An index's entries plus, per entry, the bytes the fast path compares."""

    __slots__ = ("entries", "recs", "metas", "bulk", "offs", "ends", "opened", "vcum")

    def __init__(self, entries: list[IndexEntry]) -> None:
        self.entries = entries
        # where each sample starts and ends, ascending (the index checks it): runs are found by
        # bisecting these instead of walking the entries sample by sample
        self.offs = [e.offset for e in entries]
        self.ends = [e.offset + e.size for e in entries]
        self.bulk: BulkShard | None = None  # compiled on first use, for one reader setting
        self.opened = False  # a FastDecoder has used it (see FastDecoder.bulk)
        recs = []
        # a block's metadata as its position in ``metas`` (distinct dicts: the index shares equal
        # ones), not the dict: a tuple holding only ints, strings and such is untracked by the
        # garbage collector, one holding a dict never is (three tuples a sample, some 22k objects
        # of the small text set for every full collection to traverse)
        metas: list[dict] = []
        mi: dict[int, int] = {}
        vb, vcum = 0, [0]
        for e in entries:
            blocks = []
            for j, b in enumerate(e.blocks):
                name = _name_field(payload_member(e.key, j, b, b.zstd))
                # where the name and size fields start, relative to the payload (512 and 388
                # bytes before it) and end: compared in place, no tar header is parsed
                m = mi.get(id(b.meta))
                if m is None:
                    m = mi[id(b.meta)] = len(metas)
                    metas.append(b.meta)
                blocks.append((b.offset, b.stored, b.zstd, _digest(b.xxh3), name, len(name) - BLOCK,
                               _size_field(b.stored), b.mode, b.shape, b.codec, m, b.size,
                               b.stored >= VIEW_MIN))
            hname = _name_field(header_member(e.key))
            recs.append((e.key, e.offset, hname, len(hname), tuple(blocks)))
            vb += sum(b[1] for b in blocks if b[12])
            vcum.append(vb)
        self.recs, self.metas = recs, metas
        # bytes of payloads handed out as views, cumulated: how much of a run would be views
        self.vcum = np.array(vcum, dtype=np.int64)


class FastDecoder:
    """``sample(i, buf, mv, base, views)``: sample ``i`` of a compiled shard from ``buf`` (shard
    bytes from offset ``base``, as ``bytes`` or a read-only ``mmap``; ``mv`` is
    ``memoryview(buf)``), equal to ``BlockDecoder.sample(entries[i], buf, base)``. With ``views``
    (``buf`` is a mapping that outlives the sample) payloads of ``VIEW_MIN`` bytes or more are
    handed out as views of it (:class:`ViewBlock`), verified in place, never copied.

    The caller has checked that the sample's bytes lie inside ``buf`` (the index's offsets against
    the file's size), so every slice here is in bounds; header fields are compared as short
    slices (for ``bytes`` and ``mmap`` alike a copy of under 100 bytes, cheaper than a view)."""

    def __init__(self, shard: CompiledShard, decoder: BlockDecoder) -> None:
        self.shard = shard
        self.recs, self.metas = shard.recs, shard.metas
        self.decoder = decoder
        self.verify = decoder.verify
        self._cap = decoder.limits.max_payload_bytes
        # the first decoder of a compiled index (its first pass) cuts sample by sample: compiling
        # the bulk form costs ~4 us per sample, more than it saves (~0.7) in one pass, so a shard
        # read once (a dataset larger than the index cache) never pays for it
        self._first = not shard.opened
        shard.opened = True

    def sample(self, i: int, buf: bytes, mv: memoryview, base: int, views: bool = False) -> Sample:
        key, offset, hname, hlen, blocks = self.recs[i]
        h = offset - base
        if buf[h:h + hlen] != hname:
            return self._slow(i, mv, base)
        verify = self.verify
        out = []
        metas = self.metas
        for doff, stored, zstd, xxh3, mname, mend, sfield, mode, shape, codec, mi, size, big \
                in blocks:
            meta = metas[mi]
            a = doff - base
            end = a + stored
            if buf[a - BLOCK:a + mend] != mname or buf[a - 388:a - 376] != sfield:
                return self._slow(i, mv, base)
            view = views and big
            data = mv[a:end] if view else buf[a:end]  # a view, or the payload's own bytes
            if verify and _xxh3(data) != xxh3:
                return self._slow(i, mv, base)
            if zstd:  # decompressed on first use, as the format's decoder does
                if stored < 4 or _frame_size(data) != size or size > self._cap:
                    return self._slow(i, mv, base)
                b = _new(StoredBlock)  # as StoredBlock.lazy sets it, without the call
                b.mode, b.shape, b.codec, b.meta = mode, shape, codec, meta
                b._payload, b._stored, b._size, b._cap = None, data, size, self._cap
                b._where = (self.decoder.shard, key, len(out))
            elif view:
                b = _new(ViewBlock)  # as ViewBlock.of sets it
                b.mode, b.shape, b.codec, b.meta, b._payload, b._view = (mode, shape, codec, meta,
                                                                          None, data)
            else:
                b = _new(Block)  # as Block.trusted sets it
                b.mode, b.shape, b.codec, b.payload, b.meta = mode, shape, codec, data, meta
            out.append(b)
        s = _new(Sample)
        s.key, s.blocks = key, out
        return s

    def bulk(self) -> BulkShard | None:
        """The shard's :class:`BulkShard` for this decoder's setting (compiled once, kept with
        the compiled index across passes); None on the index's first pass."""
        setting = (self.decoder.shard, self.verify, self._cap)
        b = self.shard.bulk
        if b is None and self._first:
            return None
        if b is None or b.setting != setting:
            b = self.shard.bulk = BulkShard(self.recs, self.metas, self.shard.ends, *setting)
        return b

    def _slow(self, i: int, mv: memoryview, base: int) -> Sample:
        return self.decoder.sample(self.shard.entries[i], mv, base)


class IndexCache:
    """Compiled indexes of recently read shards, kept across epochs, at most ``max_entries``
    samples in all (least recently used dropped first), so memory stays flat over epochs."""

    def __init__(self, max_entries: int = 1 << 15) -> None:
        self.max_entries = max_entries
        self._items: OrderedDict[str, CompiledShard] = OrderedDict()
        self._total = 0

    def get(self, url: str) -> CompiledShard | None:
        c = self._items.get(url)
        if c is not None:
            self._items.move_to_end(url)
        return c

    def put(self, url: str, c: CompiledShard) -> None:
        old = self._items.pop(url, None)
        if old is not None:
            self._total -= len(old.recs)
        self._items[url] = c
        self._total += len(c.recs)
        while self._total > self.max_entries and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._total -= len(dropped.recs)

    def __getstate__(self) -> dict:
        return {"max_entries": self.max_entries, "_items": OrderedDict(), "_total": 0}


def compiled_index(indexes: IndexCache, url: str, count: int, xxh3: str | None, opener: Opener,
                   limits: Limits) -> CompiledShard:
    """Shard ``url``'s compiled index: the one in ``indexes``, else its index loaded (checked
    against the manifest's ``xxh3`` and sample ``count``: a :class:`FormatError` if it is bad),
    compiled and put there."""
    comp = indexes.get(url)
    if comp is None:
        idx = load_index_typed(url, opener=opener, limits=limits, expect_xxh3=xxh3)
        if len(idx.samples) != count:
            raise IndexMismatchError(f"index lists {len(idx.samples)} samples, manifest "
                                     f"{count}", shard=url)
        comp = CompiledShard(idx.samples)
        indexes.put(url, comp)
    return comp
