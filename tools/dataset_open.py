"""Openers for datasets given as a local path or a URL (``http(s)://``, ``s3://``, any fsspec
protocol). Local paths use the format's ``local_opener``; URLs go through fsspec range reads."""

from __future__ import annotations

from typing import BinaryIO

from blocklm.formats import FormatError, TruncatedShardError
from blocklm.formats.reader import Opener, local_opener


class FsspecSource:
    """A :class:`blocklm.formats.ByteSource` over an fsspec URL."""

    def __init__(self, url: str) -> None:
        import fsspec

        self.name = url
        self.fs, self.path = fsspec.core.url_to_fs(url)

    def size(self) -> int:
        try:
            return int(self.fs.size(self.path))
        except (OSError, FileNotFoundError) as e:
            raise FormatError(f"cannot open: {e}", shard=self.name) from None

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = self.fs.cat_file(self.path, start=offset, end=offset + length)
        except (OSError, FileNotFoundError) as e:
            raise FormatError(f"cannot read: {e}", shard=self.name) from None
        if len(data) != length:
            raise TruncatedShardError(f"wanted {length} bytes at offset {offset}, got "
                                      f"{len(data)}", shard=self.name)
        return data

    def open(self) -> BinaryIO:
        return self.fs.open(self.path, "rb")


def is_url(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def opener_for(path: str) -> Opener:
    """The opener that reads ``path``'s dataset: local files, or fsspec for URLs."""
    return FsspecSource if is_url(path) else local_opener
