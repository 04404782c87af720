"""A remote byte source over any fsspec filesystem (S3 through s3fs, GCS, ...): ranged reads of
``chunk_bytes`` each, every chunk retried on its own (see :mod:`.sources` for the HTTP one)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any, BinaryIO

from blocklm.formats.errors import FormatError, TruncatedShardError

from .errors import NotFoundError, SourceError
from .retry import Attempts
from .sources import RemoteConfig, _SequentialReader


class FsspecSource:
    """A :class:`ByteSource` over any fsspec filesystem (S3 through s3fs, GCS, ...).

    Reads ask for ``chunk_bytes`` at a time with ``fs.cat_file(path, start, end)``, each retried on
    its own, so a failure costs at most one chunk.
    """

    def __init__(self, url: str, path: str, config: RemoteConfig, fs: Callable[[], Any],
                 on_retry: Callable[[], None] | None = None) -> None:
        self.name = self.url = url
        self.path = path
        self.config = config
        self._fs = fs
        self._size: int | None = None
        self.retries = 0
        self._on_retry = on_retry

    def _call(self, fn: Callable[[], Any], done: int) -> Any:
        att = Attempts(self.config.retry)
        while True:
            try:
                return fn()
            except FileNotFoundError as e:
                raise NotFoundError(f"not found: {e}", shard=self.url) from None
            except PermissionError as e:
                raise SourceError(f"permission denied: {e}", shard=self.url) from None
            except FormatError:
                raise
            except Exception as e:  # noqa: BLE001 - fsspec backends raise anything; retried, bounded
                if not att.failed(False, done):
                    raise SourceError(f"giving up after {att.total} failures: "
                                      f"{type(e).__name__}: {e}", shard=self.url) from None
                self.retries += 1
                if self._on_retry is not None:
                    self._on_retry()

    def size(self) -> int:
        if self._size is None:
            self._size = int(self._call(lambda: self._fs().size(self.path), 0))
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        parts = []
        got = 0
        step = max(1, self.config.chunk_bytes)
        while got < length:
            a = offset + got
            b = a + min(step, length - got)
            chunk = self._call(lambda a=a, b=b: self._fs().cat_file(self.path, start=a, end=b), got)
            if len(chunk) != b - a:
                raise TruncatedShardError(f"wanted {length} bytes at offset {offset}, got "
                                          f"{got + len(chunk)}", shard=self.url)
            parts.append(chunk)
            got += len(chunk)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def open(self) -> BinaryIO:
        return io.BufferedReader(_SequentialReader(self), buffer_size=1 << 20)
