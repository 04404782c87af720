"""Blocks whose payload is made on first use: zstd frames decompressed, mapped bytes copied.

Reading a shard verifies every stored payload's checksum at once (that needs no decompression),
but leaves the zstd frame compressed until ``block.payload`` (or ``block.decode()``) is used, like
a reader of the raw tar would: routing, shape bucketing and sample skipping never pay for it.
Likewise a large payload read from a memory-mapped local shard stays a read-only view of the
mapping (:class:`ViewBlock`, zero-copy; ``block.view``) until ``block.payload`` asks for bytes.
"""

from __future__ import annotations

import threading
from typing import Any

import zstandard

from .block import Block, MetaValue
from .errors import FormatError


class _ThreadContexts(threading.local):
    """One zstd decompression context per thread, made on its first use there: making one per
    payload cost 8 us of the reading thread's time holding the GIL against 0.5 us for the
    decompression of a small block itself (GPU_NOTES.md, call P132); a context may not be shared
    between threads (python-zstandard), and each decompression starts a fresh frame."""

    dctx: zstandard.ZstdDecompressor | None = None


_CONTEXTS = _ThreadContexts()


def thread_dctx() -> zstandard.ZstdDecompressor:
    """This thread's zstd decompression context."""
    d = _CONTEXTS.dctx
    if d is None:
        d = _CONTEXTS.dctx = zstandard.ZstdDecompressor()
    return d


def decompress(stored: bytes | memoryview, size: int, cap: int, *, shard: str | None = None,
               key: str | None = None, block: int | None = None,
               dctx: zstandard.ZstdDecompressor | None = None) -> bytes:
    """Undo the storage compression of one payload, checking its declared and real sizes
    against ``size`` and the ``cap`` before allocating."""
    where = {"shard": shard, "key": key, "block": block}
    declared = zstandard.frame_content_size(stored) if len(stored) >= 4 else -2
    if declared != size:
        raise FormatError(f"zstd frame declares {declared} bytes, index says {size}", **where)
    if declared > cap:
        from .errors import LimitError

        raise LimitError(f"decompressed payload of {declared} bytes exceeds limit {cap}",
                         **where)
    try:
        out = (dctx or thread_dctx()).decompress(stored, max_output_size=size)
    except zstandard.ZstdError as e:
        raise FormatError(f"zstd payload does not decompress: {e}", **where) from None
    if len(out) != size:
        raise FormatError(f"decompressed to {len(out)} bytes, expected {size}", **where)
    return out


class StoredBlock(Block):
    """A :class:`Block` read from a shard; its payload is decompressed when first used.

    It equals any block with the same fields, pickles (as its compressed bytes), and raises a
    :class:`FormatError` naming shard, key and block if the payload turns out not to decompress.
    """

    # slotted like Block (no __dict__: one object fewer per block for the collector); the
    # ``payload`` property below stands in front of Block's own slot, which stays unused
    __slots__ = ("_payload", "_stored", "_size", "_cap", "_where")

    @classmethod
    def lazy(cls, mode: str, shape: tuple[int, ...], codec: str, meta: dict[str, MetaValue],
             stored: bytes, size: int, cap: int, where: tuple[str, str, int]) -> StoredBlock:
        b = object.__new__(cls)
        b.mode, b.shape, b.codec, b.meta = mode, shape, codec, meta
        b._payload, b._stored, b._size, b._cap, b._where = None, stored, size, cap, where
        return b

    @property  # type: ignore[override]
    def payload(self) -> bytes:
        p = self._payload
        if p is None:
            shard, key, block = self._where
            p = decompress(self._stored, self._size, self._cap, shard=shard, key=key,
                           block=block)
            self._payload, self._stored = p, None
        return p

    @payload.setter
    def payload(self, value: bytes) -> None:
        self._payload, self._stored = value, None

    def __getstate__(self) -> dict[str, Any]:
        d = _slots_state(self, _STORED)
        if isinstance(d["_stored"], memoryview):  # a view of a mapped shard: send its bytes
            d["_stored"] = bytes(d["_stored"])
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        _set_slots(self, state)

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Block):
            return NotImplemented
        return ((self.mode, self.shape, self.codec, self.payload, self.meta)
                == (other.mode, other.shape, other.codec, other.payload, other.meta))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "compressed" if self._payload is None else "decompressed"
        return (f"StoredBlock(mode={self.mode!r}, shape={self.shape!r}, codec={self.codec!r}, "
                f"{state}, meta={self.meta!r})")


class ViewBlock(Block):
    """A :class:`Block` whose payload is a read-only ``memoryview`` into a memory-mapped shard.

    ``block.view`` hands out the verified bytes without copying; ``block.payload`` (and therefore
    ``decode()``) copies them into ``bytes`` once, on first use, and lets go of the view. The view
    keeps the mapping alive (a mapping is only unmapped when no view of it is left), so a block
    never points into unmapped memory. It equals any block with the same fields and pickles with
    its payload as bytes (DataLoader workers send blocks to the main process).
    """

    __slots__ = ("_payload", "_view")  # as StoredBlock's

    @classmethod
    def of(cls, mode: str, shape: tuple[int, ...], codec: str, meta: dict[str, MetaValue],
           view: memoryview) -> ViewBlock:
        b = object.__new__(cls)
        b.mode, b.shape, b.codec, b.meta, b._payload, b._view = mode, shape, codec, meta, None, view
        return b

    @property
    def view(self) -> memoryview:
        """The payload without a copy (a view of the mapped shard, or of the bytes once made)."""
        v = self._view
        return v if v is not None else memoryview(self._payload)

    @property  # type: ignore[override]
    def payload(self) -> bytes:
        p = self._payload
        if p is None:
            p = bytes(self._view)
            self._payload, self._view = p, None
        return p

    @payload.setter
    def payload(self, value: bytes) -> None:
        self._payload, self._view = value, None

    def __getstate__(self) -> dict[str, Any]:
        d = _slots_state(self, _VIEW)
        if d["_view"] is not None:
            d.update(_payload=bytes(d["_view"]), _view=None)
        return d

    def __setstate__(self, state: dict[str, Any]) -> None:
        _set_slots(self, state)

    __eq__ = StoredBlock.__eq__
    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        state = "view" if self._view is not None else "bytes"
        return (f"ViewBlock(mode={self.mode!r}, shape={self.shape!r}, codec={self.codec!r}, "
                f"{state}, meta={self.meta!r})")


# what each pickles: the fields but ``payload`` (a property here), then its own slots
_STORED = ("mode", "shape", "codec", "meta") + StoredBlock.__slots__
_VIEW = ("mode", "shape", "codec", "meta") + ViewBlock.__slots__


def _slots_state(b: Block, names: tuple[str, ...]) -> dict[str, Any]:
    return {n: getattr(b, n) for n in names}


def _set_slots(b: Block, state: dict[str, Any]) -> None:
    for n, v in state.items():
        object.__setattr__(b, n, v)
