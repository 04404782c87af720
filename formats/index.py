"""Shard indexes and dataset manifests (SPEC.md, "Index" and "Manifest").

Both are canonical JSON files beside the shards. They are untrusted input like the shards: every
field is type- and range-checked on load, with errors naming the file and sample.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import xxhash

from .block import CODEC_RE, MODE_RE, MetaValue, canonical_json, check_key, check_meta
from .errors import FormatError
from .limits import DEFAULT_LIMITS, Limits

INDEX_VERSION = 1
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"


def checksum(data: bytes | memoryview) -> str:
    """The format's checksum: xxh3-64 of the bytes, as 16 lowercase hex digits."""
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(slots=True)
class BlockInfo:
    """What the index and the sample header record of one block."""

    mode: str
    shape: tuple[int, ...]
    codec: str
    meta: dict[str, MetaValue]
    size: int  # payload bytes after storage decompression
    stored: int  # bytes of the tar member
    zstd: bool  # the member is zstd-compressed (its name ends in .zst)
    xxh3: str  # checksum of the stored bytes
    offset: int = -1  # absolute offset of the member's data in the shard (index only)
    tar_name: bytes | None = field(default=None, compare=False, repr=False)  # reader's cache

    def header_json(self) -> dict[str, Any]:
        return {"mode": self.mode, "shape": list(self.shape), "codec": self.codec,
                "meta": self.meta, "size": self.size, "stored": self.stored, "zstd": self.zstd,
                "xxh3": self.xxh3}

    def index_json(self) -> dict[str, Any]:
        d = self.header_json()
        d["offset"] = self.offset
        return d


@dataclass(slots=True)
class IndexEntry:
    """One sample in a shard index: where its members lie and what its blocks are."""

    key: str
    offset: int  # offset of the sample's first tar header
    size: int  # bytes from ``offset`` to the end of its last member (padding included)
    blocks: list[BlockInfo] = field(default_factory=list)
    tar_name: bytes | None = field(default=None, compare=False, repr=False)  # reader's cache

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "offset": self.offset, "size": self.size,
                "blocks": [b.index_json() for b in self.blocks]}


@dataclass
class ShardIndex:
    """The index of one shard: every sample's key, byte range and block descriptions."""

    shard: str  # the shard's file name, relative to the index
    shard_bytes: int
    samples: list[IndexEntry]

    def to_bytes(self) -> bytes:
        return canonical_json({"blocklm_index": INDEX_VERSION, "shard": self.shard,
                               "shard_bytes": self.shard_bytes,
                               "samples": [s.to_json() for s in self.samples]})

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "<index>",
                   limits: Limits = DEFAULT_LIMITS) -> ShardIndex:
        limits.check_bytes(len(data), "index", limits.max_index_bytes, shard=name)
        obj = _load_json(data, name)
        _field(obj, "blocklm_index", int, name)
        if obj["blocklm_index"] != INDEX_VERSION:
            raise FormatError(f"unsupported index version {obj['blocklm_index']!r} "
                              f"(this reader knows {INDEX_VERSION})", shard=name)
        shard = _field(obj, "shard", str, name)
        shard_bytes = _field(obj, "shard_bytes", int, name)
        raw = _field(obj, "samples", list, name)
        samples = []
        seen: set[str] = set()
        end = 0
        metas: dict = {}
        for i, s in enumerate(raw):
            entry = _entry_from_json(s, name, limits, index=True, metas=metas)
            if entry.key in seen:
                raise FormatError("duplicate key in index", shard=name, key=entry.key)
            seen.add(entry.key)
            if entry.offset < end or entry.offset + entry.size > shard_bytes:
                raise FormatError(f"sample {i} range [{entry.offset}, {entry.offset + entry.size})"
                                  f" overlaps another or exceeds shard_bytes {shard_bytes}",
                                  shard=name, key=entry.key)
            for j, b in enumerate(entry.blocks):
                if not entry.offset < b.offset or b.offset + b.stored > entry.offset + entry.size:
                    raise FormatError("block data range lies outside the sample's range",
                                      shard=name, key=entry.key, block=j)
            end = entry.offset + entry.size
            samples.append(entry)
        return cls(shard, shard_bytes, samples)


def _load_json(data: bytes, name: str) -> dict[str, Any]:
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"not valid JSON: {e}", shard=name) from None
    if not isinstance(obj, dict):
        raise FormatError("expected a JSON object at top level", shard=name)
    return obj


def _field(obj: Any, name: str, typ: type, where: str, key: str | None = None,
           block: int | None = None) -> Any:
    if not isinstance(obj, dict) or name not in obj:
        raise FormatError(f"missing field {name!r}", shard=where, key=key, block=block)
    v = obj[name]
    ok = isinstance(v, typ) and not (typ is int and isinstance(v, bool))
    if typ is int and ok and v < 0:
        ok = False
    if not ok:
        raise FormatError(f"field {name!r} must be a {'non-negative ' if typ is int else ''}"
                          f"{typ.__name__}, got {v!r:.80}", shard=where, key=key, block=block)
    return v


HEX16_RE = re.compile(r"^[0-9a-f]{16}$")


def block_from_json(d: Any, where: str, key: str, j: int, limits: Limits, index: bool,
                    metas: dict | None = None) -> BlockInfo:
    """Parse and validate one block description from a sample header or an index.

    The common case (a well-formed entry) takes one fused check; anything unusual goes through
    :func:`_block_from_json_checked`, which names the first field that is wrong. ``metas`` caches
    validated metadata across the blocks of one file (most blocks share theirs).
    """
    try:
        mode, codec, shape, meta = d["mode"], d["codec"], d["shape"], d["meta"]
        size, stored, zstd, xxh3 = d["size"], d["stored"], d["zstd"], d["xxh3"]
        offset = d["offset"] if index else -1
        cap = limits.max_payload_bytes
        ok = (type(mode) is str and type(codec) is str and type(shape) is list
              and type(meta) is dict and type(size) is int and type(stored) is int
              and type(zstd) is bool and type(xxh3) is str and type(offset) is int
              and 0 <= size <= cap and 0 <= stored <= cap and (offset >= 0 or not index)
              and MODE_RE.match(mode) is not None and CODEC_RE.match(codec) is not None
              and HEX16_RE.match(xxh3) is not None
              and all(type(x) is int and x >= 0 for x in shape))
    except (KeyError, TypeError):
        ok = False
    if not ok:
        return _block_from_json_checked(d, where, key, j, limits, index)
    shape_t = tuple(shape)
    limits.check_shape(shape_t, shard=where, key=key, block=j)
    if meta:
        try:
            mkey = tuple(meta.items())
            cached = metas.get(mkey) if metas is not None else None
        except TypeError:  # an unhashable value: check_meta says what is wrong
            mkey, cached = None, None
        if cached is None:
            cached = check_meta(meta, shard=where, key=key, block=j)
            if metas is not None and mkey is not None:
                metas[mkey] = cached
        meta = dict(cached)
    return BlockInfo(mode, shape_t, codec, meta, size, stored, zstd, xxh3, offset)


def _block_from_json_checked(d: Any, where: str, key: str, j: int, limits: Limits,
                             index: bool) -> BlockInfo:
    w = {"shard": where, "key": key, "block": j}
    mode = _field(d, "mode", str, where, key, j)
    codec = _field(d, "codec", str, where, key, j)
    if not MODE_RE.match(mode) or not CODEC_RE.match(codec):
        raise FormatError(f"invalid mode {mode!r} or codec {codec!r}", **w)
    shape = _field(d, "shape", list, where, key, j)
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in shape):
        raise FormatError(f"shape {shape!r:.80} must be non-negative integers", **w)
    shape_t = tuple(shape)
    limits.check_shape(shape_t, **w)
    size = _field(d, "size", int, where, key, j)
    stored = _field(d, "stored", int, where, key, j)
    limits.check_bytes(size, "payload", **w)
    limits.check_bytes(stored, "stored payload", **w)
    zstd = _field(d, "zstd", bool, where, key, j)
    xxh3 = _field(d, "xxh3", str, where, key, j)
    if not HEX16_RE.match(xxh3):
        raise FormatError(f"checksum {xxh3!r:.40} is not 16 lowercase hex digits", **w)
    meta = check_meta(_field(d, "meta", dict, where, key, j), **w)
    offset = _field(d, "offset", int, where, key, j) if index else -1
    return BlockInfo(mode, shape_t, codec, meta, size, stored, zstd, xxh3, offset)


def _entry_from_json(s: Any, where: str, limits: Limits, index: bool,
                     metas: dict | None = None) -> IndexEntry:
    key = _field(s, "key", str, where)
    check_key(key, shard=where)
    blocks = _field(s, "blocks", list, where, key)
    if len(blocks) > limits.max_blocks:
        raise FormatError(f"{len(blocks)} blocks > limit {limits.max_blocks}", shard=where, key=key)
    infos = [block_from_json(b, where, key, j, limits, index, metas)
             for j, b in enumerate(blocks)]
    offset = _field(s, "offset", int, where, key) if index else -1
    size = _field(s, "size", int, where, key) if index else -1
    return IndexEntry(key, offset, size, infos)


def parse_sample_header(data: bytes, *, shard: str, key: str,
                        limits: Limits = DEFAULT_LIMITS) -> list[BlockInfo]:
    """Parse a sample's ``KEY.blocks.json`` member (SPEC.md, "Sample header")."""
    limits.check_bytes(len(data), "sample header", limits.max_header_bytes, shard=shard, key=key)
    obj = _load_json(data, shard)
    if obj.get("blocklm") != 1:
        raise FormatError(f"unsupported sample header version {obj.get('blocklm')!r}",
                          shard=shard, key=key)
    if obj.get("key") != key:
        raise FormatError(f"sample header names key {obj.get('key')!r}", shard=shard, key=key)
    return _entry_from_json(obj, shard, limits, index=False).blocks


def sample_header_bytes(key: str, blocks: list[BlockInfo]) -> bytes:
    """The canonical ``KEY.blocks.json`` member for a sample."""
    return canonical_json({"blocklm": 1, "key": key, "blocks": [b.header_json() for b in blocks]})


@dataclass
class ShardInfo:
    """A shard's line in the manifest."""

    shard: str
    index: str
    index_xxh3: str
    samples: int
    bytes: int
    modes: dict[str, dict[str, int]]  # mode -> {"blocks", "payload_bytes", "stored_bytes"}

    def to_json(self) -> dict[str, Any]:
        return {"shard": self.shard, "index": self.index, "index_xxh3": self.index_xxh3,
                "samples": self.samples, "bytes": self.bytes, "modes": self.modes}


def mode_totals(entries: list[IndexEntry]) -> dict[str, dict[str, int]]:
    """Per-mode block counts and byte totals over index entries."""
    out: dict[str, dict[str, int]] = {}
    for e in entries:
        for b in e.blocks:
            t = out.setdefault(b.mode, {"blocks": 0, "payload_bytes": 0, "stored_bytes": 0})
            t["blocks"] += 1
            t["payload_bytes"] += b.size
            t["stored_bytes"] += b.stored
    return dict(sorted(out.items()))


@dataclass
class Manifest:
    """A dataset's list of shards with sample counts, bytes, per-mode totals, index checksums."""

    shards: list[ShardInfo]

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    @property
    def modes(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for s in self.shards:
            for m, t in s.modes.items():
                acc = out.setdefault(m, {"blocks": 0, "payload_bytes": 0, "stored_bytes": 0})
                for k in acc:
                    acc[k] += t.get(k, 0)
        return dict(sorted(out.items()))

    def to_bytes(self) -> bytes:
        return canonical_json({"blocklm_manifest": MANIFEST_VERSION, "samples": self.samples,
                               "bytes": self.bytes, "modes": self.modes,
                               "shards": [s.to_json() for s in self.shards]})

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = MANIFEST_NAME,
                   limits: Limits = DEFAULT_LIMITS) -> Manifest:
        limits.check_bytes(len(data), "manifest", limits.max_index_bytes, shard=name)
        obj = _load_json(data, name)
        if obj.get("blocklm_manifest") != MANIFEST_VERSION:
            raise FormatError(f"unsupported manifest version {obj.get('blocklm_manifest')!r}",
                              shard=name)
        shards = []
        for s in _field(obj, "shards", list, name):
            fields = {k: _field(s, k, t, name) for k, t in
                      (("shard", str), ("index", str), ("index_xxh3", str), ("samples", int),
                       ("bytes", int), ("modes", dict))}
            for rel in (fields["shard"], fields["index"]):
                if rel.startswith("/") or ".." in rel.split("/") or "\\" in rel:
                    raise FormatError(f"manifest path {rel!r} escapes the dataset", shard=name)
            shards.append(ShardInfo(**fields))
        return cls(shards)
