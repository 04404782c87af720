"""Local shards kept mapped across passes, so an epoch does not pay for mapping them again.

Mapping a file is cheap, but filling its page tables is not: for a shard of 8 MB, mapping it,
faulting its pages in and unmapping it costs several times what checking its checksums does. The
loader therefore keeps the :class:`~blocklm.formats.reader.LocalSource` of recently read local
shards (their mappings) in this bounded LRU, per process, across epochs. Dropping a source only
drops the cache's reference: payload views handed out keep their mapping alive until released.
"""

from __future__ import annotations

from collections import OrderedDict

from blocklm.formats.reader import ByteSource


class MapCache:
    """Sources of local shards (``mapped()``) by URL, at most ``max_bytes`` of mapped files and
    ``max_files`` files (each mapping holds a file descriptor) in all, least recently used dropped
    first; ``max_bytes=0`` disables the cache. Mapped pages count in the RSS of the process while
    mapped, though they are the kernel's page cache, shared and reclaimable, not private memory."""

    def __init__(self, max_bytes: int = 1 << 30, max_files: int = 256) -> None:
        self.max_bytes, self.max_files = max_bytes, max_files
        self._items: OrderedDict[str, tuple[ByteSource, int]] = OrderedDict()
        self._total = 0

    def get(self, url: str) -> ByteSource | None:
        hit = self._items.get(url)
        if hit is None:
            return None
        self._items.move_to_end(url)
        return hit[0]

    def put(self, url: str, source: ByteSource) -> bool:
        """Keep ``source`` (whose file has been mapped); False if it is too large to keep (the
        caller then closes it itself)."""
        size = source.size()
        if size > self.max_bytes:
            return False
        old = self._items.pop(url, None)
        if old is not None:
            self._total -= old[1]
            if old[0] is not source:
                old[0].close()
        self._items[url] = (source, size)
        self._total += size
        while self._total > self.max_bytes or len(self._items) > self.max_files:
            _, (dropped, n) = self._items.popitem(last=False)
            self._total -= n
            dropped.close()
        return True

    def __contains__(self, url: str) -> bool:
        return url in self._items

    def clear(self) -> None:
        for src, _ in self._items.values():
            src.close()
        self._items.clear()
        self._total = 0

    def __getstate__(self) -> dict:
        return {"max_bytes": self.max_bytes, "max_files": self.max_files, "_items": OrderedDict(), "_total": 0}
