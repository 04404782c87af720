"""Typed errors of the block-list format.

Every error names where it happened (shard path or URL, sample key, block index) so a failure in a
long job can be traced to one record without re-running anything.
"""

from __future__ import annotations


class FormatError(ValueError):
    """Base class: something read from or written to a shard breaks the format (SPEC.md)."""

    def __init__(
        self,
        message: str,
        *,
        shard: str | None = None,
        key: str | None = None,
        block: int | None = None,
    ) -> None:
        self.shard = shard
        self.key = key
        self.block = block
        self.reason = message
        where = []
        if shard is not None:
            where.append(f"shard {shard}")
        if key is not None:
            where.append(f"sample {key!r}")
        if block is not None:
            where.append(f"block {block}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)

    def __reduce__(self):  # keep the context when an error crosses a process boundary
        return (_rebuild, (type(self), self.reason, self.shard, self.key, self.block))


def _rebuild(cls, reason, shard, key, block):
    return cls(reason, shard=shard, key=key, block=block)


class ChecksumError(FormatError):
    """A payload's bytes do not match the checksum recorded in the index or header."""


class LimitError(FormatError):
    """A declared shape, payload size or decompressed size exceeds the configured limits."""


class UnsafeMemberError(FormatError):
    """A tar member is not a plain file with a safe relative name (links, devices, ``..``)."""


class IndexMismatchError(FormatError):
    """The index disagrees with the shard bytes (wrong offsets, names or sizes)."""


class TruncatedShardError(FormatError):
    """The shard ends before the data its headers or index promise."""


class CodecError(FormatError):
    """A payload cannot be encoded or decoded by its codec, or does not match its shape."""


class CodecUnavailableError(ImportError):
    """A codec's library cannot be loaded (``soundfile`` without its ``cffi`` backend or
    libsndfile, say). Not the data's fault: every block of that codec would fail the same way,
    so readers, the dispatcher and the converters stop with this message instead of rejecting
    the blocks one by one (and retrying the failed import for each, ~5 ms a block)."""


class MissingFileError(FormatError):
    """A shard, index or manifest does not exist where it was looked for."""
