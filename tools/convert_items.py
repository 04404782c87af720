"""The unit of conversion work: an :class:`Item` (one future sample) and the worker that turns it
into encoded shard bytes or a rejection.

Sources (``convert_sources*``) enumerate items cheaply in the parent process; workers read, build,
check and encode them in parallel. Headers alone accept truncated and corrupt files, so every
image and audio file is checked: PNG, JPEG and WAV by their structure (chunk CRCs, segment
lengths, end markers: ``blocklm.formats.integrity``), every other format by a full decode, and
all of them by a full decode as well with ``deep_check`` (``--deep-check``). Items are small and
picklable: file contents are read by the worker, not the parent.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, field

from blocklm.formats import (
    Block,
    FormatError,
    Sample,
    audio_file_block,
    bytes_block,
    check_integrity,
    image_file_block,
    text_block,
)
from blocklm.formats.codecs import plain_wav_block
from blocklm.formats.integrity import INTEGRITY_CODECS
from blocklm.formats.writer import SampleEncoder

IMAGE_EXTS = {"png", "jpg", "jpeg", "webp", "bmp", "gif", "tif", "tiff"}
AUDIO_EXTS = {"wav", "flac", "ogg", "opus", "mp3", "sph"}
TEXT_EXTS = {"txt", "text", "caption", "transcript", "md"}


# slots: ~190 bytes less per item (no instance dicts) and ~10% faster to make (a walk makes one
# item per file; a forked helper touches every item it converts: fewer pages to copy for it)
@dataclass(slots=True)
class Part:
    """One block to build: how (``image``, ``audio``, ``text``, ``auto``, ``bytes``), a mode, and
    where its content is (a file ``path`` with optional byte range, or inline ``data``/``text``)."""

    how: str
    mode: str
    path: str | None = None
    offset: int = 0
    size: int = -1  # -1: the whole file
    data: bytes | None = None
    text: str | None = None
    text_errors: str = "strict"
    meta: dict = field(default_factory=dict)


@dataclass(slots=True)
class Item:
    """One future sample: its key, its blocks, and the input it came from (for the report).

    ``error`` set means the source already rejected this input (e.g. a broken manifest line).
    """

    source: str
    key: str = ""
    parts: list[Part] = field(default_factory=list)
    error: str | None = None


@dataclass(slots=True)
class Result:
    """One item's outcome: its encoded sample (members, size, key, index template and totals, or
    where a helper holds them), or a rejection reason."""

    source: str
    encoded: tuple | None = None  # (parts, size, key, template, totals): ShardWriter.write_packed
    payload_bytes: int = 0
    error: str | None = None
    spill: tuple | None = None  # (hold, position, size, key, template, totals): span_packed


def how_for_ext(ext: str) -> str | None:
    """The builder for a file extension (lowercase, no dot), or None if unknown."""
    ext = ext.lower()
    if ext in IMAGE_EXTS:
        return "image"
    if ext in AUDIO_EXTS:
        return "audio"
    if ext in TEXT_EXTS:
        return "text"
    return None


def read_part(p: Part) -> bytes:
    """The raw bytes of a part (file or range); OSError propagates."""
    if p.data is not None:
        return p.data
    # plain os calls: a buffered file object costs more than reading a ~7 KB WAV
    fd = os.open(p.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        if p.size >= 0:
            data = os.pread(fd, p.size, p.offset)
            if len(data) != p.size:
                raise OSError(f"short read: {len(data)} of {p.size} bytes at offset {p.offset}")
            return data
        # a small file whole in one read, its end confirmed by an empty one (cheaper than fstat)
        data = os.read(fd, _FIRST_READ)
        if len(data) < _FIRST_READ and not (more := os.read(fd, _FIRST_READ)):
            return data
        st = os.fstat(fd)
        if len(data) == _FIRST_READ and stat.S_ISREG(st.st_mode):  # larger: again, in one go
            data = os.pread(fd, st.st_size + 1, 0)  # one byte more: a file that grew is whole
            if len(data) <= st.st_size:
                return data
            os.lseek(fd, len(data), os.SEEK_SET)
            rest = [data]
        else:  # not a regular file (a pipe): read on to its end
            rest = [data] if len(data) == _FIRST_READ else [data, more]
        while chunk := os.read(fd, 1 << 20):
            rest.append(chunk)
        return b"".join(rest)
    finally:
        os.close(fd)


_FIRST_READ = 1 << 16


def build_block(p: Part, deep_check: bool = False) -> Block:
    """Build and validate one block (``deep_check``: decode every image and audio file, even those
    a structural check covers); raises FormatError/CodecError/OSError/ValueError."""
    if p.text is not None:
        return text_block(p.text, p.mode, p.meta)
    data = read_part(p)
    if not data:
        raise FormatError("empty file (0 bytes)")
    how = p.how
    if how == "auto":
        how = _sniff(data)
        if p.mode == "auto":  # mode follows what the bytes turned out to be
            p = Part(how, how if how != "bytes" else "data", p.path, p.offset, p.size, data,
                     None, p.text_errors, p.meta)
    if how == "image":
        b = image_file_block(data, p.mode, p.meta)
    elif how == "audio":
        b = audio_file_block(data, p.mode, p.meta)
        if b.shape[0] == 0:
            raise FormatError("audio has no frames")
    elif how == "text":
        try:
            text = data.decode("utf-8", errors=p.text_errors)
        except UnicodeDecodeError as e:
            raise FormatError(f"not UTF-8 text ({e.reason} at byte {e.start}); "
                              "use --text-errors replace to keep it") from None
        return text_block(text, p.mode, p.meta)
    else:
        return bytes_block(p.mode, (len(data),), data, meta=p.meta)
    # headers alone accept truncated and corrupt files: check the structure where the format
    # allows it (one pass over the bytes), else decode (the decode re-reads the header: cheap)
    if b.codec in INTEGRITY_CODECS:
        check_integrity(b.codec, b.payload)
    if deep_check or b.codec not in INTEGRITY_CODECS:
        b.decode()
    return b


def _sniff(data: bytes) -> str:
    """Image or audio or bytes, by trying the format's header probes (only for parts of no known
    kind: the builder then probes the header once more, which is cheap; nothing is decoded)."""
    from blocklm.formats.codecs import probe_audio, probe_image

    for how, probe in (("image", probe_image), ("audio", probe_audio)):
        try:
            probe(data)
            return how
        except FormatError:
            continue
    return "bytes"


_ENCODER: SampleEncoder | None = None  # one per worker process: holds a zstd context


def build_sample(item: Item, deep_check: bool = False) -> Sample:
    """The item's sample, every block built and checked (``deep_check``: see
    :func:`build_block`); raises :class:`Rejected` with the reason."""
    if item.error is not None:
        raise Rejected(item.error)
    blocks = []
    for i, p in enumerate(item.parts):
        try:
            blocks.append(build_block(p, deep_check))
        except (FormatError, OSError, ValueError) as e:
            where = f"block {i} ({p.path})" if p.path and len(item.parts) > 1 else \
                (f"block {i}" if len(item.parts) > 1 else "")
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            if isinstance(e, OSError):
                reason = f"unreadable: {reason}"
            raise Rejected(_OBJ_REPR.sub("the data", f"{where}: {reason}" if where else reason)) \
                from None
    try:
        return Sample(item.key, blocks)
    except (FormatError, ValueError) as e:
        raise Rejected(_OBJ_REPR.sub("the data", str(e))) from None


def encoder() -> SampleEncoder:
    """This process's encoder (one per worker process: it holds a zstd context)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = SampleEncoder()
    return _ENCODER


def encode_item(item: Item, deep_check: bool = False) -> tuple[tuple, int]:
    """``(packed, payload bytes)`` of the item's sample, ``packed`` being ``(members as byte
    strings, size, key, index template, totals)`` (``SampleEncoder.encode_packed`` with the
    key, for ``ShardWriter.write_packed``); raises :class:`Rejected` with the reason."""
    if len(item.parts) == 1 and item.error is None and not deep_check:
        p = item.parts[0]
        if p.how in _FILE_BUILDERS and p.data is None and p.text is None and not p.meta:
            return _encode_file(item, p)
    return _encode_general(item, deep_check)


def _encode_general(item: Item, deep_check: bool) -> tuple[tuple, int]:
    sample = build_sample(item, deep_check)
    try:
        # the blocks were validated when built (Block.__post_init__) and nothing changed them
        parts, size, template, totals = encoder().encode_packed(sample, validated=True)
    except (FormatError, ValueError) as e:
        raise Rejected(_OBJ_REPR.sub("the data", str(e))) from None
    return (parts, size, sample.key, template, totals), sum(len(b.payload) for b in sample.blocks)


_FILE_BUILDERS = {"image": image_file_block, "audio": audio_file_block}


def _encode_file(item: Item, p: Part) -> tuple[tuple, int]:
    """:func:`encode_item` of a sample of one image or audio file (most items), without the
    general path's layers; the same checks, bytes and reasons."""
    try:
        data = read_part(p)
        if not data:
            raise FormatError("empty file (0 bytes)")
        if p.how == "audio" and (b := plain_wav_block(data, p.mode)) is not None:
            if b.shape[0] == 0:  # structure checked by the probe
                raise FormatError("audio has no frames")
        else:
            b = _FILE_BUILDERS[p.how](data, p.mode)
            if p.how == "audio" and b.shape[0] == 0:
                raise FormatError("audio has no frames")
            if b.codec in INTEGRITY_CODECS:
                check_integrity(b.codec, b.payload)
            else:
                b.decode()
    except (FormatError, OSError, ValueError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        if isinstance(e, OSError):
            reason = f"unreadable: {reason}"
        raise Rejected(_OBJ_REPR.sub("the data", reason)) from None
    try:  # the key is checked by the encoder, as Sample() would
        parts, size, template, totals = encoder().encode_file(item.key, b)
    except (FormatError, ValueError) as e:
        raise Rejected(_OBJ_REPR.sub("the data", str(e))) from None
    return (parts, size, item.key, template, totals), len(data)


def process(item: Item, deep_check: bool = False) -> Result:
    """The item's encoded sample, or the reason it is rejected (``deep_check``: see
    :func:`build_block`)."""
    try:
        packed, payload = encode_item(item, deep_check)
    except Rejected as e:
        return Result(item.source, error=str(e))
    return Result(item.source, packed, payload)


_OBJ_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")  # keeps reasons the same on every run


class Rejected(Exception):
    """An input cannot be converted; the message is the reason the report gives."""
