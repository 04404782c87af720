"""Cutting a chunk of neighbouring samples at once: the same checks as the fast path, in bulk.

:class:`~.fastpath.FastDecoder` checks a sample with three short slice compares, one checksum
call and the construction of its Sample and Blocks, about 2 us of Python per sample. For small
samples (2 KB of text) that is the loader's whole cost, so a chunk of consecutive samples of one
shard is checked here with far fewer Python operations:

- every name and size field the fast path compares, for the whole chunk, with one numpy gather of
  the bytes at those positions and one ``bytes`` compare (positions and expected bytes compiled
  once per shard, kept with its compiled index);
- the payloads sliced and their checksums computed by ``map`` (no bytecode per block), compared
  as one list of ints against the recorded ones; zstd frame sizes likewise;
- Blocks made from a per-block row of their fields with the payload put in (slotted records:
  no dict per block).

If anything at all differs (a field, a checksum, a frame size) the chunk returns None and the
caller cuts it again sample by sample with the fast path, which hands each failure to the format's
decoder: results and errors are identical by construction, only the common case is faster.
Samples with a payload of ``VIEW_MIN`` bytes or more read from a mapping are not cut here (they
become views, already cheap per byte).
"""

from __future__ import annotations

from itertools import compress

import numpy as np
from xxhash import xxh3_64_intdigest as _xxh3
from zstandard import ZstdError
from zstandard import frame_content_size as _frame_size

from blocklm.formats.block import Block, Sample
from blocklm.formats.lazy import StoredBlock
from blocklm.formats.tar import BLOCK

_new = object.__new__


class BulkShard:
    """What cutting chunks of one shard needs, compiled once from its compiled index records
    (``CompiledShard.recs``) for one reader setting (``shard`` name, ``verify``, payload ``cap``).

    Memory: 5 bytes per compared header byte (some 100 per sample) plus a row, a payload range
    and a checksum per block: about 1 KB per sample, kept as long as the index is. Rows hold
    only strings, numbers and tuples of them (metadata by its position in ``metas``), and
    ranges are two lists of ints, not slices: the garbage collector untracks such tuples, and
    full collections while training do not traverse three objects per sample."""

    __slots__ = ("setting", "pos", "exp", "cum", "bcum", "nobulk", "big", "dstarts", "dstops",
                 "digs", "zmask", "zcum", "zsizes", "rows", "single", "metas")

    def __init__(self, recs: list, metas: list[dict], ends: list[int], shard: str, verify: bool,
                 cap: int) -> None:
        self.setting = (shard, verify, cap)
        starts: list[int] = []
        lens: list[int] = []
        exp: list[bytes] = []
        cum, bcum, nobulk, big = [0], [0], [0], [0]
        dstarts, dstops, digs, zmask, zcum, zsizes, rows = [], [], [], [], [0], [], []
        single = True
        for (key, offset, hname, hlen, blocks), end in zip(recs, ends):
            starts.append(offset)
            lens.append(hlen)
            exp.append(hname)
            n = hlen
            # every compared byte must lie in the sample's own range (which the run holds); an
            # index that says otherwise is left to the fast path (numpy would wrap or raise)
            odd = offset + hlen > end
            has_big = False
            tmpls = []
            for j, (doff, stored, zstd, xxh3, mname, _mend, sfield, mode, shape, codec, mi,
                    size, bigb) in enumerate(blocks):
                odd |= doff - BLOCK < offset
                starts += (doff - BLOCK, doff - 388)
                lens += (len(mname), len(sfield))
                exp += (mname, sfield)
                n += len(mname) + len(sfield)
                dstarts.append(doff)
                dstops.append(doff + stored)
                digs.append(xxh3)
                has_big |= bigb
                zmask.append(zstd)
                zcum.append(zcum[-1] + zstd)
                if zstd:
                    # the fast path's own checks that need no bytes: anything odd goes to it
                    odd |= stored < 4 or size > cap
                    zsizes.append(size)
                tmpls.append((zstd, mode, shape, codec, mi, size, (shard, key, j)))
                odd |= verify and xxh3 < 0
            single &= len(blocks) == 1
            rows.append((key, tuple(tmpls)))
            cum.append(cum[-1] + n)
            bcum.append(bcum[-1] + len(blocks))
            nobulk.append(nobulk[-1] + odd)
            big.append(big[-1] + has_big)
        s = np.array(starts, dtype=np.int64)
        ln = np.array(lens, dtype=np.int64)
        first = np.cumsum(ln) - ln  # where each compared field starts in the gathered bytes
        pos = np.repeat(s - first, ln) + np.arange(int(ln.sum()), dtype=np.int64)
        # 32-bit positions for shards under 2 GiB: half the memory (~370 B per sample), and
        # ``take`` gathers with them at nearly the speed of 64-bit ones (0.03 us per sample more)
        self.pos = pos.astype(np.int32) if len(pos) and pos.max() < 2**31 else pos
        self.exp = b"".join(exp)
        self.cum, self.bcum, self.nobulk, self.big = cum, bcum, nobulk, big
        self.dstarts, self.dstops, self.digs, self.metas = dstarts, dstops, digs, metas
        self.zmask, self.zcum, self.zsizes = zmask, zcum, zsizes
        self.single = single
        # single-block samples (all text, most audio): a flat row per sample for a flat loop
        self.rows = [(k, *t[0]) for k, t in rows] if single else rows

    def usable(self, l0: int, l1: int, views: bool) -> bool:
        """Whether samples ``l0..l1-1`` can be cut here (none odd; no view wanted)."""
        return (self.nobulk[l1] == self.nobulk[l0]
                and (not views or self.big[l1] == self.big[l0]))

    def cut(self, l0: int, l1: int, buf: bytes, arr: np.ndarray, base: int) -> list | None:
        """Samples ``l0..l1-1`` from ``buf`` (shard bytes from offset ``base``; ``arr`` is
        ``np.frombuffer(buf, uint8)``), or None if any check fails (cut them one by one then).
        The caller has checked the samples' bytes lie in ``buf``."""
        c0, c1 = self.cum[l0], self.cum[l1]
        pos = self.pos[c0:c1]
        try:
            got = arr.take(pos if base == 0 else pos - base).tobytes()
        except IndexError:  # a field past the buffer: the fast path reports it
            return None
        if got != self.exp[c0:c1]:
            return None
        b0, b1 = self.bcum[l0], self.bcum[l1]
        if base == 0:  # the slices made in C, as they are used
            datas = list(map(buf.__getitem__, map(slice, self.dstarts[b0:b1], self.dstops[b0:b1])))
        else:
            datas = [buf[a - base:e - base] for a, e in zip(self.dstarts[b0:b1],
                                                            self.dstops[b0:b1])]
        if self.setting[1] and list(map(_xxh3, datas)) != self.digs[b0:b1]:
            return None
        z0, z1 = self.zcum[b0], self.zcum[b1]
        if z1 > z0:
            try:
                if list(map(_frame_size, compress(datas, self.zmask[b0:b1]))) \
                        != self.zsizes[z0:z1]:
                    return None
            except ZstdError:  # not a frame: the fast path reports it
                return None
        out = []
        app = out.append
        cap, metas = self.setting[2], self.metas
        if self.single:
            for (key, zstd, mode, shape, codec, mi, size, where), data in zip(self.rows[l0:l1],
                                                                              datas):
                meta = metas[mi]
                if zstd:  # as StoredBlock.lazy sets it, without the call
                    b = _new(StoredBlock)
                    b.mode, b.shape, b.codec, b.meta = mode, shape, codec, meta
                    b._payload, b._stored, b._size, b._cap, b._where = None, data, size, cap, where
                else:  # as Block.trusted sets it
                    b = _new(Block)
                    b.mode, b.shape, b.codec, b.payload, b.meta = mode, shape, codec, data, meta
                s = _new(Sample)
                s.key, s.blocks = key, [b]
                app(s)
            return out
        nxt = iter(datas).__next__
        for key, tmpls in self.rows[l0:l1]:
            blocks = []
            for zstd, mode, shape, codec, mi, size, where in tmpls:
                meta = metas[mi]
                if zstd:
                    b = _new(StoredBlock)
                    b.mode, b.shape, b.codec, b.meta = mode, shape, codec, meta
                    b._payload, b._stored, b._size, b._cap, b._where = (None, nxt(), size, cap,
                                                                         where)
                else:
                    b = _new(Block)
                    b.mode, b.shape, b.codec, b.payload, b.meta = mode, shape, codec, nxt(), meta
                blocks.append(b)
            s = _new(Sample)
            s.key, s.blocks = key, blocks
            app(s)
        return out
