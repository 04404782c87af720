"""Sample headers and shard indexes as canonical JSON, built by string formatting.

``canonical_json`` (``json.dumps`` with sorted keys) costs ~5 us per sample header and ~4 us per
index entry, a large part of a conversion's CPU for small files. The objects have a fixed
layout (SPEC.md, "Sample header" and "Index"), so their canonical form is assembled here from
the fields; only block metadata goes through ``canonical_json`` (cached: most files of a corpus
share theirs). The output is byte-identical to ``sample_header_bytes`` and
``ShardIndex.to_bytes`` (tests/formats/test_writer.py checks both on varied blocks).
"""

from __future__ import annotations

import json
import re

from .block import canonical_json
from .codecs import codec_info
from .index import INDEX_VERSION, BlockInfo, IndexEntry

# strings JSON writes as they are, between quotes (keys, modes and codecs always are)
_PLAIN = re.compile(r"[A-Za-z0-9_\-./ ]*")
_META_CACHE: dict[tuple, str] = {}
_META_CACHE_MAX = 4096  # distinct metadata dicts kept (a corpus of mixed rates or modes)


def quoted(s: str) -> str:
    """``s`` as a JSON string (what ``canonical_json`` writes for it)."""
    if _PLAIN.fullmatch(s):
        return f'"{s}"'
    return json.dumps(s, ensure_ascii=False)


def meta_json(meta: dict) -> str:
    """``canonical_json(meta)`` as text, cached when every value is a ``str`` or an ``int``
    (the cache key holds the exact types: ``1``, ``True`` and ``1.0`` are equal as dict keys
    but not as JSON)."""
    if not meta:
        return "{}"
    items = tuple(meta.items())
    for _, v in items:
        t = type(v)
        if t is not str and t is not int:
            return canonical_json(meta).decode("utf-8")
    text = _META_CACHE.get(items)
    if text is None:
        text = canonical_json(meta).decode("utf-8")
        if len(_META_CACHE) < _META_CACHE_MAX:
            _META_CACHE[items] = text
    return text


_HEAD_CACHE: dict[tuple, tuple] = {}


def block_head(mode: str, codec: str, meta: dict) -> tuple[str, bool, tuple]:
    """What a one-block encoder needs of a block's mode, codec and metadata, cached (a corpus
    has few distinct ones): the header JSON up to the shape (:func:`block_json`'s ``head``),
    whether the codec is zstd-compressed, and the payload member's name after ``KEY`` with the
    byte sum of that name (for the tar checksum), without and with ``.zst``. The cache key
    holds exact value types, as in :func:`meta_json`; ``mode`` is a valid mode."""
    items = tuple(meta.items()) if meta else ()
    for _, v in items:
        t = type(v)
        if t is not str and t is not int:
            return _head(mode, codec, meta)
    ck = (mode, codec, items)
    hit = _HEAD_CACHE.get(ck)
    if hit is None:
        hit = _head(mode, codec, meta)
        if len(_HEAD_CACHE) < _META_CACHE_MAX:
            _HEAD_CACHE[ck] = hit
    return hit


def _head(mode: str, codec: str, meta: dict) -> tuple[str, bool, tuple]:
    info = codec_info(codec)
    head = f'{{"codec":{quoted(codec)},"meta":{meta_json(meta)},"mode":{quoted(mode)},'
    plain = f".0.{mode}.{info.ext}".encode("ascii")
    return head, info.zstd, ((plain, sum(plain)), (plain + b".zst", sum(plain + b".zst")))


def block_json(b: BlockInfo) -> tuple[str, str]:
    """The block's header JSON cut where the index adds ``"offset":N,`` (keys are sorted:
    codec, meta, mode, [offset,] shape, size, stored, xxh3, zstd)."""
    shape = ",".join([f"{d:d}" for d in b.shape])
    head = f'{{"codec":{quoted(b.codec)},"meta":{meta_json(b.meta)},"mode":{quoted(b.mode)},'
    tail = (f'"shape":[{shape}],"size":{b.size:d},"stored":{b.stored:d},'
            f'"xxh3":{quoted(b.xxh3)},"zstd":{"true" if b.zstd else "false"}}}')
    return head, tail


def header_bytes(key: str, blocks: list[BlockInfo],
                 cut: list[tuple[str, str]] | None = None) -> bytes:
    """The ``KEY.blocks.json`` member: equal to ``index.sample_header_bytes(key, blocks)``.
    ``cut``: a list that receives each block's :func:`block_json` (for :func:`entry_template`)."""
    parts = list(map(block_json, blocks))
    if cut is not None:
        cut.extend(parts)
    body = ",".join([h + t for h, t in parts])
    return f'{{"blocklm":1,"blocks":[{body}],"key":{quoted(key)}}}'.encode()


def entry_template(key: str, size: int, blocks: list[BlockInfo],
                   cut: list[tuple[str, str]]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """A sample's index entry with its offsets left open: ``(pieces, offsets)``, the block
    offsets relative to the sample's start, then 0 (the sample itself). :func:`render` fills
    them in once the writer knows where the sample lies, so an encoder (in any process) does
    the formatting and the writer's index costs one join per sample."""
    pieces, offsets = [], []
    cur = '{"blocks":['
    for i, (b, (head, tail)) in enumerate(zip(blocks, cut)):
        pieces.append(f'{cur}{"," if i else ""}{head}"offset":')
        offsets.append(b.offset)
        cur = "," + tail
    pieces.append(f'{cur}],"key":{quoted(key)},"offset":')
    offsets.append(0)
    pieces.append(f',"size":{size:d}}}')
    return tuple(pieces), tuple(offsets)


def render(template: tuple[tuple[str, ...], tuple[int, ...]], base: int) -> str:
    """The index entry of :func:`entry_template` for a sample starting at byte ``base``."""
    pieces, offsets = template
    if len(offsets) == 2:  # one block: most samples
        return f"{pieces[0]}{base + offsets[0]:d}{pieces[1]}{base:d}{pieces[2]}"
    out = [pieces[0]]
    for piece, off in zip(pieces[1:], offsets):
        out.append(f"{base + off:d}")
        out.append(piece)
    return "".join(out)


def entry_json(e: IndexEntry) -> str:
    """One sample of an index: equal to ``canonical_json(e.to_json())`` as text."""
    blocks = ",".join([f'{h}"offset":{b.offset:d},{t}'
                       for b, (h, t) in zip(e.blocks, map(block_json, e.blocks))])
    return (f'{{"blocks":[{blocks}],"key":{quoted(e.key)},"offset":{e.offset:d},'
            f'"size":{e.size:d}}}')


def index_bytes(shard: str, shard_bytes: int, samples: list[IndexEntry] | list[str]) -> bytes:
    """A shard index: equal to ``ShardIndex(shard, shard_bytes, samples).to_bytes()``; the
    samples as entries or as their :func:`entry_json` texts."""
    body = ",".join(samples if samples and isinstance(samples[0], str) else
                    map(entry_json, samples))
    return (f'{{"blocklm_index":{INDEX_VERSION},"samples":[{body}],"shard":{quoted(shard)},'
            f'"shard_bytes":{shard_bytes:d}}}').encode()
