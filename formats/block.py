"""The records of the format: :class:`Block` and :class:`Sample` (SPEC.md, "Records")."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import FormatError

KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*$")
MODE_RE = re.compile(r"^[a-z][a-z0-9_]{0,15}$")
CODEC_RE = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
META_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_KEY_CHARS = 64  # keeps every member name within the 100-byte ustar name field
MAX_META_BYTES = 4096

MetaValue = str | int | float | bool | None


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding the format writes: sorted keys, no spaces, UTF-8 (SPEC.md)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def check_key(key: object, **where) -> str:
    """Validate a sample key (SPEC.md, "Keys"); return it."""
    if not isinstance(key, str) or not KEY_RE.match(key) or len(key) > MAX_KEY_CHARS:
        raise FormatError(
            f"invalid sample key {key!r}: use 1-{MAX_KEY_CHARS} of [A-Za-z0-9_-] "
            "in '/'-separated segments, no dots", **where)
    return key


def check_meta(meta: object, **where) -> dict[str, MetaValue]:
    """Validate block metadata: a small flat mapping of lowercase names to JSON scalars."""
    if not isinstance(meta, Mapping):
        raise FormatError(f"block metadata must be a mapping, got {type(meta).__name__}", **where)
    out: dict[str, MetaValue] = {}
    for k, v in meta.items():
        if not isinstance(k, str) or not META_KEY_RE.match(k):
            raise FormatError(f"invalid metadata name {k!r}: use [a-z][a-z0-9_]*", **where)
        if isinstance(v, float) and not math.isfinite(v):
            raise FormatError(f"metadata {k!r} is not a finite number: {v!r}", **where)
        if v is not None and not isinstance(v, (str, int, float, bool)):
            raise FormatError(
                f"metadata {k!r} must be a string, number, boolean or null, got "
                f"{type(v).__name__}", **where)
        out[k] = v
    if len(canonical_json(out)) > MAX_META_BYTES:
        raise FormatError(f"block metadata exceeds {MAX_META_BYTES} bytes as JSON", **where)
    return out


# blocklm.formats.codecs (which imports this module), imported by the first decode: an import
# statement in ``decode`` cost ~0.9 us a block, ~7 ms an epoch of gpu_mixed4 in the read-ahead
# thread holding the GIL (GPU_NOTES.md, call P132)
_CODECS: Any = None


def _import_codecs() -> Any:
    global _CODECS
    from . import codecs

    _CODECS = codecs
    return codecs


# Slotted (no per-instance ``__dict__``): the read-ahead and in-flight samples of a training run
# are some 16k Samples and as many Blocks, and each dict was one more object for every full
# garbage collection to traverse (`python -m blocklm.tools.bench_turnover`); weak references
# to them still work (``weakref_slot``), as they did
@dataclass(eq=True, slots=True, weakref_slot=True)
class Block:
    """One block of a sample: a mode, a shape, a codec and the codec's payload bytes.

    ``payload`` is the codec's encoding of the content (e.g. the PNG file, UTF-8 text); the
    storage compression of SPEC.md is applied by the writer and undone by the reader, so it never
    shows here. ``decode()`` turns the payload into content (``str``, ``numpy`` array or
    ``bytes``) through the codec registry; an unknown codec decodes to its bytes.
    """

    mode: str
    shape: tuple[int, ...]
    codec: str
    payload: bytes
    meta: dict[str, MetaValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(self.shape)
        self.validate()

    def validate(self, **where) -> None:
        """Raise :class:`FormatError` unless the fields obey SPEC.md (not the payload's content)."""
        if not isinstance(self.mode, str) or not MODE_RE.match(self.mode):
            raise FormatError(f"invalid mode {self.mode!r}: use [a-z][a-z0-9_]{{0,15}}", **where)
        if not isinstance(self.codec, str) or not CODEC_RE.match(self.codec):
            raise FormatError(f"invalid codec {self.codec!r}: use [a-z][a-z0-9_]{{0,31}}", **where)
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.shape):
            raise FormatError(f"shape {self.shape!r} must be non-negative integers", **where)
        if isinstance(self.payload, (bytearray, memoryview)):
            self.payload = bytes(self.payload)
        if not isinstance(self.payload, bytes):
            raise FormatError(f"payload must be bytes, got {type(self.payload).__name__}", **where)
        self.meta = check_meta(self.meta, **where)

    @classmethod
    def trusted(cls, mode: str, shape: tuple[int, ...], codec: str, payload: bytes,
                meta: dict[str, MetaValue]) -> Block:
        """Build a block from fields a reader has already validated (skips ``__post_init__``)."""
        b = object.__new__(cls)
        b.mode, b.shape, b.codec, b.payload, b.meta = mode, shape, codec, payload, meta
        return b

    def decode(self) -> Any:
        """Decode the payload into content by its codec (``blocklm.formats.codecs``)."""
        codecs = _CODECS or _import_codecs()
        return codecs.decode_block(self)

    @property
    def numel(self) -> int:
        """Number of elements the shape declares."""
        return math.prod(self.shape)


@dataclass(eq=True, slots=True, weakref_slot=True)
class Sample:
    """A training example: a unique key and an ordered list of blocks."""

    key: str
    blocks: list[Block] = field(default_factory=list)

    def __post_init__(self) -> None:
        check_key(self.key)
        self.blocks = list(self.blocks)
        for i, b in enumerate(self.blocks):
            if not isinstance(b, Block):
                raise FormatError(f"expected a Block, got {type(b).__name__}", key=self.key,
                                  block=i)

    @classmethod
    def trusted(cls, key: str, blocks: list[Block]) -> Sample:
        """Build a sample from parts a reader has already validated (skips ``__post_init__``)."""
        s = object.__new__(cls)
        s.key, s.blocks = key, blocks
        return s

    @property
    def modes(self) -> list[str]:
        """The mode of each block, in order."""
        return [b.mode for b in self.blocks]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """The shape of each block, in order."""
        return [b.shape for b in self.blocks]
