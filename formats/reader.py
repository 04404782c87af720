"""Reading shards: by index (one range read per sample or run of samples) or by scanning the tar.

The byte source is pluggable (:class:`ByteSource`): local files here; the loaders in
``blocklm.pipeline`` add HTTP, S3 and any fsspec URL. Every payload is checked against its
checksum (``verify=True``) and every size is capped before allocation (SPEC.md, "Reading").
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import zstandard

from .block import Block, Sample
from .errors import (
    ChecksumError,
    FormatError,
    IndexMismatchError,
    LimitError,
    MissingFileError,
    TruncatedShardError,
)
from .index import (
    MANIFEST_NAME,
    BlockInfo,
    IndexEntry,
    Manifest,
    ShardIndex,
    checksum,
    parse_sample_header,
)
from .lazy import StoredBlock
from .limits import DEFAULT_LIMITS, Limits
from .local import LocalSource
from .tar import BLOCK, header_matches, padded, parse_header
from .writer import header_member, index_name, payload_member

RUN_BYTES = 8 << 20  # sequential iteration reads runs of consecutive samples up to this size


class ByteSource(Protocol):
    """Random-access bytes of one file: a local path, a URL, an object in a bucket."""

    name: str

    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes from ``offset``; :class:`TruncatedShardError` if fewer."""
        ...

    def open(self) -> BinaryIO:
        """A sequential binary stream from the start of the file."""
        ...


Opener = Callable[[str], ByteSource]


def local_opener(path: str) -> ByteSource:
    """The default opener: local paths and ``file://`` URLs."""
    return LocalSource(path[7:] if path.startswith("file://") else path)


def join_url(base: str, rel: str) -> str:
    """``rel`` resolved beside ``base`` (a folder path or URL)."""
    return base.rstrip("/") + "/" + rel


class BlockDecoder:
    """Turns index entries plus the bytes they point at into verified :class:`Sample`s."""

    def __init__(self, shard: str, *, verify: bool = True, limits: Limits = DEFAULT_LIMITS) -> None:
        self.shard, self.verify, self.limits = shard, verify, limits

    def block(self, stored: bytes | memoryview, info: BlockInfo, key: str, j: int) -> Block:
        """Check one block's member bytes and make its :class:`Block` (a zstd payload stays
        compressed until used: :class:`~blocklm.formats.lazy.StoredBlock`)."""
        if self.verify and checksum(stored) != info.xxh3:
            raise ChecksumError(f"payload checksum {checksum(stored)} != recorded {info.xxh3} "
                                f"({info.stored} stored bytes)", shard=self.shard, key=key,
                                block=j)
        if not info.zstd:
            return Block.trusted(info.mode, info.shape, info.codec, bytes(stored), info.meta)
        declared = zstandard.frame_content_size(stored) if len(stored) >= 4 else -2
        if declared != info.size:
            raise FormatError(f"zstd frame declares {declared} bytes, index says {info.size}",
                              shard=self.shard, key=key, block=j)
        self.limits.check_bytes(declared, "decompressed payload", shard=self.shard, key=key,
                                block=j)
        return StoredBlock.lazy(info.mode, info.shape, info.codec, info.meta, bytes(stored),
                                info.size, self.limits.max_payload_bytes, (self.shard, key, j))

    def payload(self, stored: bytes | memoryview, info: BlockInfo, key: str, j: int) -> bytes:
        """Check one block's member bytes and return its payload, decompressed now."""
        return self.block(stored, info, key, j).payload

    def sample(self, entry: IndexEntry, buf: bytes | memoryview, base: int) -> Sample:
        """The sample of ``entry`` from ``buf``, which holds shard bytes from offset ``base``."""
        mv = memoryview(buf)
        key = entry.key
        at = entry.offset - base
        if entry.tar_name is None:
            entry.tar_name = _name_field(header_member(key))
        if mv[at:at + 100] != entry.tar_name and not header_matches(
                mv[at:at + BLOCK], header_member(key), None):
            raise IndexMismatchError(f"no member {header_member(key)!r} at offset {entry.offset}",
                                     shard=self.shard, key=key)
        blocks = []
        for j, info in enumerate(entry.blocks):
            at = info.offset - base
            if info.tar_name is None:
                info.tar_name = _name_field(payload_member(key, j, info, info.zstd))
            # fast path: the name and size fields exactly as this format's writer formats them
            if (mv[at - BLOCK:at - BLOCK + 100] != info.tar_name
                    or mv[at - BLOCK + 124:at - BLOCK + 136] != b"%011o\0" % info.stored):
                name = payload_member(key, j, info, info.zstd)
                if not header_matches(mv[at - BLOCK:at], name, info.stored):
                    raise IndexMismatchError(f"no member {name!r} of {info.stored} bytes before "
                                             f"offset {info.offset}", shard=self.shard, key=key,
                                             block=j)
            blocks.append(self.block(mv[at:at + info.stored], info, key, j))
        return Sample.trusted(key, blocks)


def _name_field(name: str) -> bytes:
    """The 100-byte ustar name field of a member called ``name``."""
    return name.encode("ascii").ljust(100, b"\0")


class ShardReader:
    """Read one shard: iterate it, or read sample ``i`` with one range read, using its index.

    ``index`` is a :class:`ShardIndex`, or None to load ``PREFIX-NNNNNN.index.json`` beside the
    shard (and, if there is none, to build it by scanning the tar once).
    """

    def __init__(self, shard: str, *, index: ShardIndex | None = None, verify: bool = True,
                 limits: Limits = DEFAULT_LIMITS, opener: Opener = local_opener,
                 index_xxh3: str | None = None) -> None:
        self.shard = shard
        self.source = opener(shard)
        self.limits = limits
        self.decoder = BlockDecoder(shard, verify=verify, limits=limits)
        if index is None:
            index = load_index(shard, opener=opener, limits=limits, expect_xxh3=index_xxh3)
        self.index = index

    def __len__(self) -> int:
        return len(self.index.samples)

    def keys(self) -> list[str]:
        return [e.key for e in self.index.samples]

    def __getitem__(self, i: int) -> Sample:
        entry = self.index.samples[i]
        return self.decoder.sample(entry, self.source.read(entry.offset, entry.size), entry.offset)

    def __iter__(self) -> Iterator[Sample]:
        entries = self.index.samples
        i = 0
        while i < len(entries):
            j, start = i, entries[i].offset
            end = entries[i].offset + entries[i].size
            while j + 1 < len(entries) and entries[j + 1].offset + entries[j + 1].size - start \
                    <= RUN_BYTES:
                j += 1
                end = entries[j].offset + entries[j].size
            buf = self.source.read(start, end - start)
            for e in entries[i:j + 1]:
                yield self.decoder.sample(e, buf, start)
            i = j + 1


def load_index(shard: str, *, opener: Opener = local_opener, limits: Limits = DEFAULT_LIMITS,
               expect_xxh3: str | None = None) -> ShardIndex:
    """Load the index beside ``shard``; build it by scanning the shard if there is none (and no
    manifest promised one). Any other failure to read the index is raised, never papered over
    by a scan (which, remotely, would download the whole shard)."""
    base, _, name = shard.rpartition("/")
    iname = index_name(name)
    ipath = join_url(base, iname) if base else iname
    try:
        src = opener(ipath)
        data = src.read(0, min(src.size(), limits.max_index_bytes + 1))
    except (MissingFileError, FileNotFoundError):
        if expect_xxh3 is not None:
            raise
        return build_index(shard, opener=opener, limits=limits)
    if expect_xxh3 is not None and checksum(data) != expect_xxh3:
        raise ChecksumError(f"index checksum {checksum(data)} != manifest's {expect_xxh3}",
                            shard=ipath)
    idx = ShardIndex.from_bytes(data, name=ipath, limits=limits)
    if idx.shard != name:
        raise IndexMismatchError(f"index describes shard {idx.shard!r}, not {name!r}", shard=ipath)
    return idx


def scan_shard(stream: BinaryIO, *, shard: str, verify: bool = True,
               limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[IndexEntry, Sample]]:
    """Parse a shard sequentially from its tar headers and sample headers (no index needed)."""
    dec = BlockDecoder(shard, verify=verify, limits=limits)
    pos = 0

    def member() -> tuple[str, int, int] | None:
        nonlocal pos
        parsed = parse_header(stream.read(BLOCK), shard=shard)
        if parsed is None:
            return None
        name, size = parsed
        pos += BLOCK
        return name, size, pos

    def data(size: int, cap: int) -> bytes:
        nonlocal pos
        limits.check_bytes(size, "member", cap, shard=shard)
        raw = stream.read(padded(size))
        if len(raw) != padded(size):
            raise TruncatedShardError(f"member data ends at offset {pos + len(raw)}, "
                                      f"{padded(size)} bytes promised", shard=shard)
        pos += padded(size)
        return raw[:size]

    while True:
        start = pos
        m = member()
        if m is None:
            return
        name, size, _ = m
        if not name.endswith(".blocks.json"):
            raise FormatError(f"member {name!r} is not part of a sample (expected a "
                              "KEY.blocks.json header)", shard=shard)
        key = name[:-len(".blocks.json")]
        infos = parse_sample_header(data(size, limits.max_header_bytes), shard=shard, key=key,
                                    limits=limits)
        blocks = []
        for j, info in enumerate(infos):
            m = member()
            want = payload_member(key, j, info, info.zstd)
            if m is None or m[0] != want or m[1] != info.stored:
                got = "end of archive" if m is None else f"{m[0]!r} of {m[1]} bytes"
                raise FormatError(f"expected member {want!r} of {info.stored} bytes, found {got}",
                                  shard=shard, key=key, block=j)
            info.offset = m[2]
            blocks.append(dec.block(data(info.stored, limits.max_payload_bytes), info, key, j))
        yield IndexEntry(key, start, pos - start, infos), Sample(key, blocks)


def build_index(shard: str, *, opener: Opener = local_opener, verify: bool = True,
                limits: Limits = DEFAULT_LIMITS) -> ShardIndex:
    """Rebuild a shard's index by scanning it (verifies every checksum on the way)."""
    src = opener(shard)
    with src.open() as f:
        entries = [e for e, _ in scan_shard(f, shard=shard, verify=verify, limits=limits)]
    return ShardIndex(shard.rpartition("/")[2], src.size(), entries)


@dataclass
class DatasetShard:
    """One shard of a resolved dataset: its location and (from the manifest) its index checksum."""

    url: str
    index_xxh3: str | None = None
    samples: int | None = None


def read_manifest(path: str | os.PathLike, *, opener: Opener = local_opener,
                  limits: Limits = DEFAULT_LIMITS) -> Manifest:
    """Load ``manifest.json`` from a dataset folder (or the manifest file itself)."""
    p = str(path)
    url = p if p.endswith(".json") else join_url(p, MANIFEST_NAME)
    src = opener(url)
    size = src.size()
    if size > limits.max_index_bytes:
        raise LimitError(f"manifest of {size} bytes exceeds limit", shard=url)
    return Manifest.from_bytes(src.read(0, size), name=url, limits=limits)


def resolve_dataset(path: str | os.PathLike, *, opener: Opener = local_opener,
                    limits: Limits = DEFAULT_LIMITS) -> list[DatasetShard]:
    """The shards of a dataset folder, a manifest file, or a single ``.tar`` shard, in order."""
    p = str(path)
    if p.endswith(".tar"):
        return [DatasetShard(p)]
    manifest = read_manifest(p, opener=opener, limits=limits)
    base = p.rpartition("/")[0] if p.endswith(".json") else p
    return [DatasetShard(join_url(base, s.shard), s.index_xxh3, s.samples)
            for s in manifest.shards]


def iter_index(path: str | os.PathLike, *, opener: Opener = local_opener,
               limits: Limits = DEFAULT_LIMITS) -> Iterator[tuple[str, IndexEntry]]:
    """``(shard, entry)`` for every sample of a dataset, from the indexes alone (no payloads)."""
    for s in resolve_dataset(path, opener=opener, limits=limits):
        for e in load_index(s.url, opener=opener, limits=limits,
                            expect_xxh3=s.index_xxh3).samples:
            yield s.url, e


def iter_dataset(path: str | os.PathLike, *, verify: bool = True, opener: Opener = local_opener,
                 limits: Limits = DEFAULT_LIMITS) -> Iterator[Sample]:
    """Every sample of a dataset (folder, manifest or ``.tar``), in shard and index order."""
    for s in resolve_dataset(path, opener=opener, limits=limits):
        yield from ShardReader(s.url, verify=verify, opener=opener, limits=limits,
                               index_xxh3=s.index_xxh3)
