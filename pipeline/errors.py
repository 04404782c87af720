"""Typed errors of the loaders: bytes that could not be fetched, data that could not be planned.

They extend :class:`blocklm.formats.FormatError`, so they name the shard (URL) and, where one is
known, the sample key, and they survive crossing a DataLoader worker's process boundary.
"""

from __future__ import annotations

from blocklm.formats.errors import FormatError, MissingFileError


class SourceError(FormatError):
    """A remote or local read failed for good (retries exhausted, or an error not worth retrying)."""


class NotFoundError(SourceError, MissingFileError):
    """The shard, index or manifest does not exist at its URL (HTTP 404, missing S3 key or file)."""


class StateError(ValueError):
    """A ``state_dict`` that does not fit this dataset (other seed, sources, ranks or epoch)."""
