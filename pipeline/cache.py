"""An LRU cache of whole remote files on local disk, capped in bytes.

A file is downloaded under a temporary name unique to the process, checked against the remote size,
flushed and then renamed to its final name, so a reader only ever opens complete files (a crash
leaves a temporary file that is never served and is swept later). Using a file refreshes its
modification time; adding one evicts the least recently used until the folder fits the cap. An
evicted file stays readable by anyone who already opened it (POSIX unlink semantics), and cached
sources open their file at once for that reason.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from pathlib import Path

from blocklm.formats.errors import TruncatedShardError
from blocklm.formats.reader import ByteSource, LocalSource

COPY_BYTES = 8 << 20
STALE_TMP_S = 3600.0  # a temporary file untouched this long belongs to a dead download


class ShardCache:
    """Whole remote files cached under ``folder``, at most ``max_bytes`` in all.

    ``hits``, ``misses`` and ``evictions`` count this process's uses.
    """

    def __init__(self, folder: str | os.PathLike, max_bytes: int) -> None:
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.hits = self.misses = self.evictions = 0

    def path_for(self, url: str) -> Path:
        """The final cache file name of ``url``: a hash of the URL plus its base name."""
        digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:24]
        base = "".join(c if c.isalnum() or c in "._-" else "_" for c in url.rpartition("/")[2])
        return self.folder / f"{digest}-{base[-80:]}"

    def open(self, url: str, remote: ByteSource) -> ByteSource:
        """A local source over the cached copy of ``url``, downloading it from ``remote`` if
        needed. A file larger than the whole cache is not cached: ``remote`` is returned."""
        path = self.path_for(url)
        src = self._open_cached(path)
        if src is not None:
            self.hits += 1
            return src
        size = remote.size()
        if size > self.max_bytes:
            return remote
        self.misses += 1
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")
        try:
            with open(tmp, "wb") as f:
                pos = 0
                while pos < size:
                    n = min(COPY_BYTES, size - pos)
                    f.write(remote.read(pos, n))
                    pos += n
                f.flush()
                os.fsync(f.fileno())
            if tmp.stat().st_size != size:  # pragma: no cover - read() guarantees the length
                raise TruncatedShardError(f"downloaded {tmp.stat().st_size} of {size} bytes",
                                          shard=url)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        src = self._open_cached(path)
        self.evict(keep=path)
        if src is None:  # pragma: no cover - evicted by another process in between
            return remote
        return src

    def _open_cached(self, path: Path) -> LocalSource | None:
        src = LocalSource(path)
        try:
            src._fileno()  # open now: a later eviction must not pull the file from under us
        except Exception:  # noqa: BLE001 - not cached (or just evicted)
            return None
        try:
            os.utime(path)
        except OSError:
            pass
        return src

    def entries(self) -> list[tuple[float, int, Path]]:
        """``(mtime, bytes, path)`` of every complete cached file, least recently used first."""
        out = []
        if not self.folder.is_dir():
            return out
        now = time.time()
        for p in self.folder.iterdir():
            try:
                st = p.stat()
            except OSError:
                continue
            if p.name.startswith("."):
                if p.name.endswith(".part") and now - st.st_mtime > STALE_TMP_S:
                    p.unlink(missing_ok=True)
                continue
            out.append((st.st_mtime, st.st_size, p))
        return sorted(out)

    def total_bytes(self) -> int:
        return sum(n for _, n, _ in self.entries())

    def evict(self, keep: Path | None = None) -> None:
        """Remove least recently used files until the cache fits ``max_bytes``."""
        entries = self.entries()
        total = sum(n for _, n, _ in entries)
        for _, n, p in entries:
            if total <= self.max_bytes:
                break
            if p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= n
            self.evictions += 1
