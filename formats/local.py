"""Local shard files as a :class:`~blocklm.formats.reader.ByteSource`: read with ``os.pread``, or
memory-mapped read-only for zero-copy views (the loaders' local fast path)."""

from __future__ import annotations

import mmap
import os
import sys
from pathlib import Path
from typing import BinaryIO

from .errors import FormatError, MissingFileError, TruncatedShardError

_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22 if sys.platform == "linux" else None)


class LocalSource:
    """A :class:`ByteSource` over a local file, read with ``os.pread`` (no shared file offset),
    or mapped read-only for zero-copy views (:meth:`mapped`, :meth:`view`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.name = str(path)
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None
        self._populated = bytearray()  # per MiB of the mapping: page tables already filled

    def mapped(self) -> tuple[mmap.mmap, memoryview] | None:
        """The whole file mapped read-only and a memoryview of it (None for an empty file).

        Slicing the ``mmap`` copies (cheap for short header compares); slicing the view does not.
        Views stay valid after :meth:`close`: a mapping is unmapped only when its last view is
        released. (Like any mapping, a file truncated by another process while mapped faults on
        access: shards are written once, under a temporary name, then renamed.)"""
        if self._map is None:
            size = self.size()
            if size == 0:
                return None
            self._map = mmap.mmap(self._fileno(), size, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            self._populated = bytearray((size + (1 << 20) - 1) >> 20)
        return self._map, self._view  # type: ignore[return-value]

    def populate(self, start: int, end: int) -> None:
        """Fill the page tables of bytes ``[start, end)`` of the mapping in one system call rather
        than one fault per few pages (Linux >= 5.14; elsewhere pages fault in on first touch).
        Each 1 MiB of the file is populated once per mapping: asking again for pages already
        mapped costs as much as checking their checksums."""
        if self._map is None or _POPULATE_READ is None:
            return
        done = self._populated
        lo, hi = start >> 20, (end + (1 << 20) - 1) >> 20
        while lo < hi and done[lo]:
            lo += 1
        while hi > lo and done[hi - 1]:
            hi -= 1
        if lo >= hi:
            return
        a, b = lo << 20, min(hi << 20, len(self._map))
        try:
            self._map.madvise(_POPULATE_READ, a, b - a)
        except (OSError, ValueError):
            pass  # not supported here: pages fault in as they are touched
        done[lo:hi] = b"\1" * (hi - lo)

    def view(self, offset: int, length: int) -> memoryview:
        """Exactly ``length`` bytes from ``offset`` as a read-only view of the mapped file (no
        copy); :class:`TruncatedShardError` if the file is shorter."""
        m = self.mapped()
        have = 0 if m is None else len(m[0])
        if offset < 0 or length < 0 or offset + length > have:
            raise TruncatedShardError(f"wanted {length} bytes at offset {offset}, file has "
                                      f"{have} bytes", shard=self.name)
        return m[1][offset:offset + length]  # type: ignore[index]

    def _fileno(self) -> int:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                raise MissingFileError("no such file", shard=self.name) from None
            except OSError as e:
                raise FormatError(f"cannot open: {e.strerror}", shard=self.name) from None
        return self._fd

    def size(self) -> int:
        return os.fstat(self._fileno()).st_size

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fileno(), length, offset)
        if len(data) != length:
            raise TruncatedShardError(f"wanted {length} bytes at offset {offset}, file has "
                                      f"{self.size()} bytes", shard=self.name)
        return data

    def open(self) -> BinaryIO:
        try:
            return open(self.path, "rb")
        except FileNotFoundError:
            raise MissingFileError("no such file", shard=self.name) from None
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", shard=self.name) from None

    def close(self) -> None:
        self._map = self._view = None  # unmapped once the views handed out are released
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()
