"""ShardWriter: samples -> tar shards + indexes + manifest (SPEC.md, "Writing").

Deterministic (the same samples give byte-identical files) and crash-safe: a shard and its index
are written under temporary names and renamed only when both are complete, index first, so a file
under a final shard name always has its index beside it.
"""

from __future__ import annotations

import _thread
import os
from pathlib import Path

from .block import Sample
from .encoder import (  # noqa: F401 - re-exported: the writer's side of the format
    ZSTD_LEVEL,
    ZSTD_SMALL,
    SampleEncoder,
    header_member,
    payload_member,
)
from .errors import FormatError
from .headers import entry_json, index_bytes, render
from .index import (
    MANIFEST_NAME,
    IndexEntry,
    Manifest,
    ShardInfo,
    checksum,
)
from .limits import DEFAULT_LIMITS, Limits
from .tar import END_OF_ARCHIVE

SYNC_AHEAD = 8 << 20  # bytes written between background fdatasyncs of an open shard
# Write buffer of a shard: each write() into the page cache has a fixed cost (~5 us on ext4),
# and the default 8 KB buffer made one per small sample; 256 KB saved ~10% of a conversion's
# CPU on the sample WAVs, and payloads larger than it still go straight to the file.
WRITE_BUFFER = 256 << 10


def shard_name(prefix: str, n: int) -> str:
    """The file name of shard ``n``: ``PREFIX-NNNNNN.tar``."""
    return f"{prefix}-{n:06d}.tar"


def index_name(shard: str) -> str:
    """The index file name beside a shard: ``PREFIX-NNNNNN.index.json``."""
    return shard[:-4] + ".index.json" if shard.endswith(".tar") else shard + ".index.json"


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (``durable``: the file
    is on disk, ``fsync``, before it is renamed)."""
    tmp = path.with_name(path.name + ".tmp")
    _write_synced(tmp, data, durable)
    os.replace(tmp, path)


def _write_synced(path: Path, data: bytes, durable: bool = True) -> None:
    with open(path, "wb") as f:
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())


def _copy(src: int, dst: int, n: int, src_off: int, dst_off: int) -> int:
    """Copy up to ``n`` bytes between files in the kernel: ``copy_file_range`` (one file system),
    else ``sendfile`` (from an in-memory file: ``copy_file_range`` refuses to cross file
    systems), else through memory."""
    try:
        return os.copy_file_range(src, dst, n, src_off, dst_off)
    except (AttributeError, OSError):
        pass
    try:
        os.lseek(dst, dst_off, os.SEEK_SET)  # sendfile writes at the file's position
        return os.sendfile(dst, src, src_off, n)
    except (AttributeError, OSError):
        return os.pwrite(dst, os.pread(src, min(n, 1 << 24), src_off), dst_off)


class ShardWriter:
    """Write samples into ``PREFIX-NNNNNN.tar`` shards with indexes and a manifest.

    A new shard starts before a sample that would take the current one past ``max_bytes`` or
    ``max_samples`` (a shard always holds at least one sample). ``close()`` (or leaving the
    ``with`` block) finishes the last shard and writes ``manifest.json`` listing ``previous``
    shards (already on disk, e.g. when resuming) followed by the ones written here.

    ``durable`` (the default): every shard, index and the manifest is on disk (``fsync``) before
    it gets its final name, so even a power loss leaves no partial file under a final name.
    ``durable=False`` leaves the writing back to the page cache: a killed process still leaves
    no partial file under a final name (the renames come after complete writes, and the page
    cache outlives the process), but a power loss soon after may.
    """

    def __init__(self, out_dir: str | os.PathLike, *, max_bytes: int | None = 256 << 20,
                 max_samples: int | None = None, prefix: str = "shard", start: int = 0,
                 previous: list[ShardInfo] | None = None, level: int = ZSTD_LEVEL,
                 limits: Limits = DEFAULT_LIMITS, write_manifest: bool = True,
                 durable: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.max_samples = max_bytes, max_samples
        self.prefix, self.next_number = prefix, start
        self.shards: list[ShardInfo] = list(previous or [])
        self.write_manifest = write_manifest
        self.durable = durable
        self._encoder = SampleEncoder(level, limits)
        self._file = None
        self._name = ""
        self._count = 0  # samples in the open shard
        self._modes: dict[str, list[int]] = {}  # the open shard's mode -> [blocks, payload, stored]
        self._json: list[str] = []  # the open shard's index entries as text
        self._keys: set[str] = set()
        self._pos = 0
        self._span: tuple[int, int, int] | None = None  # pending write_span run: fd, offset, size
        self._synced = 0  # bytes of the open shard handed to a sync-ahead
        self._syncer: _thread.LockType | None = None  # held while a sync-ahead runs
        self._sync_error: OSError | None = None
        # copies write_span runs in another process: ``copy(src_fd, src_offset, size, dst_fd,
        # dst_offset)`` orders one, ``wait()`` returns once all are written (tools/convert_hold.py)
        self.span_copier = None
        self.closed = False

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, sample: Sample) -> None:
        """Append one sample; keys must be unique within a shard."""
        if self.closed:
            raise FormatError("write() on a closed ShardWriter")
        self.write_encoded(*self._encoder.encode_indexed(sample))

    def write_encoded(self, data: bytes | list[bytes], entry: IndexEntry,
                      template: tuple | None = None) -> None:
        """Append a sample already encoded by :meth:`SampleEncoder.encode` (e.g. in a worker
        process: encoding is the costly part, writing stays in order in one process), or the
        list of byte strings :meth:`SampleEncoder.encode_parts` gives (no joined copy);
        ``template``: the entry's index text from :meth:`SampleEncoder.encode_indexed`."""
        if isinstance(data, list):
            size = sum(map(len, data))
        else:
            size, data = len(data), [data]
        self._room(size, entry.key, "write_encoded")
        self.flush_spans()
        self._file.writelines(data)
        entry.size = size
        self._add_entry(entry, template)
        if self._pos - self._synced >= SYNC_AHEAD:
            self._sync_ahead()

    def write_span(self, src_fd: int, src_offset: int, entry: IndexEntry,
                   template: tuple | None = None) -> None:
        """Append a sample already encoded into a file (``entry.size`` bytes at ``src_offset`` of
        ``src_fd``, e.g. a worker's spill file), with the same shard boundaries as
        :meth:`write_encoded`. The bytes are copied in the kernel (``copy_file_range``), runs of
        adjacent samples in one go, when the shard is finished or :meth:`flush_spans` is called;
        ``src_fd`` must stay open until then."""
        self._room(entry.size, entry.key, "write_span")
        self._extend_span(src_fd, src_offset, entry.size)
        self._add_entry(entry, template)

    def write_packed(self, parts: list[bytes], size: int, key: str, template: tuple,
                     totals: tuple) -> None:
        """Append a sample as :meth:`SampleEncoder.encode_packed` gives it: its members as byte
        strings (``size`` bytes in all), its key, its index template and per-block
        ``(mode, payload bytes, stored bytes)``. The same shards as :meth:`write` (tested);
        a converter's path, with no index entry objects to build and shift."""
        self._room(size, key, "write_packed")
        if self._span is not None:
            self.flush_spans()
        self._file.writelines(parts)
        self._json.append(render(template, self._pos))
        self._keys.add(key)
        self._account(totals)
        self._pos += size
        if self._pos - self._synced >= SYNC_AHEAD:
            self._sync_ahead()

    def span_packed(self, src_fd: int, src_offset: int, size: int, key: str, template: tuple,
                    totals: tuple) -> None:
        """:meth:`write_span` of a sample described as for :meth:`write_packed`: its ``size``
        bytes lie at ``src_offset`` of ``src_fd``."""
        self._room(size, key, "span_packed")
        self._extend_span(src_fd, src_offset, size)
        self._json.append(render(template, self._pos))
        self._keys.add(key)
        self._account(totals)
        self._pos += size

    def _room(self, size: int, key: str, what: str) -> None:
        """Make room for a sample of ``size`` bytes (open a shard, or finish a full one and open
        the next); refuse a key the open shard already has."""
        if self.closed:
            raise FormatError(f"{what}() on a closed ShardWriter")
        if self._file is None or self._full(size):
            if self._file is not None:
                self._finish_shard()
            self._open_shard()
        if key in self._keys:
            raise FormatError("duplicate key in shard", shard=self._name, key=key)

    def _extend_span(self, src_fd: int, src_offset: int, size: int) -> None:
        span = self._span
        if span is not None and (span[0] != src_fd or span[1] + span[2] != src_offset):
            self.flush_spans()
            span = None
        self._span = (src_fd, src_offset, size) if span is None else \
            (src_fd, span[1], span[2] + size)

    def flush_spans(self) -> None:
        """Copy the pending run of :meth:`write_span` samples into the open shard."""
        if self._span is None:
            return
        src_fd, src_off, size = self._span
        self._span = None
        f = self._file
        f.flush()  # the span is the tail of the shard: it ends at self._pos
        start, done = self._pos - size, 0
        if self.span_copier is not None:  # written by the process that holds the bytes
            self.span_copier.copy(src_fd, src_off, size, f.fileno(), start)
            done = size
        while done < size:
            n = _copy(src_fd, f.fileno(), size - done, src_off + done, start + done)
            if n <= 0:
                raise FormatError(f"spill file ends {size - done} bytes early", shard=self._name)
            done += n
        f.seek(start + size)
        if self._pos - self._synced >= SYNC_AHEAD:
            self._sync_ahead()

    def _sync_ahead(self) -> None:
        """Start writing the shard's bytes so far to disk in the background (``fdatasync`` in a
        thread), so the ``fsync`` that finishes the shard waits for the last few MB only
        instead of the whole shard."""
        if not self.durable:  # nothing to hand over: the page cache writes it back in its time
            self._synced = self._pos
            return
        if self._syncer is not None:
            if self._syncer.locked():
                return
            self._stop_syncer()
        self._file.flush()
        self._synced = self._pos
        # a bare thread: threading.Thread.start() waits until the new thread runs, which took
        # up to 25 ms on 2 busy cores (a new thread queues behind the running processes)
        done = _thread.allocate_lock()
        done.acquire()
        self._syncer = done
        _thread.start_new_thread(self._fdatasync, (self._file.fileno(), done))

    def _fdatasync(self, fd: int, done: _thread.LockType) -> None:
        try:
            os.fdatasync(fd)
        except OSError as e:  # raised by _stop_syncer: the kernel reports a write error once
            self._sync_error = e
        finally:
            done.release()

    def _stop_syncer(self) -> None:
        """Wait for the background sync (before the file is closed: it uses the fd) and raise
        its error, if any: a later ``fsync`` would not report it again."""
        if self._syncer is not None:
            self._syncer.acquire()  # released by the thread when its fdatasync returns
            self._syncer = None
        err, self._sync_error = self._sync_error, None
        if err is not None:
            raise err

    def _add_entry(self, entry: IndexEntry, template: tuple | None) -> None:
        if template is not None:  # the index text now: no sweep over the entries at the end
            self._json.append(render(template, self._pos))
        entry.offset += self._pos
        for b in entry.blocks:
            b.offset += self._pos
        if template is None:
            self._json.append(entry_json(entry))
        self._keys.add(entry.key)
        self._account([(b.mode, b.size, b.stored) for b in entry.blocks])
        self._pos += entry.size

    def _account(self, totals) -> None:
        self._count += 1
        modes = self._modes
        for mode, size, stored in totals:
            t = modes.get(mode)
            if t is None:
                modes[mode] = [1, size, stored]
            else:
                t[0] += 1
                t[1] += size
                t[2] += stored

    def _full(self, incoming: int) -> bool:
        if self.max_samples is not None and self._count >= self.max_samples:
            return True
        return (self.max_bytes is not None
                and self._pos + incoming + len(END_OF_ARCHIVE) > self.max_bytes)

    def _open_shard(self) -> None:
        self._name = shard_name(self.prefix, self.next_number)
        self.next_number += 1
        self._file = open(self.out_dir / (self._name + ".tmp"), "wb", buffering=WRITE_BUFFER)
        self._count, self._modes, self._json, self._keys = 0, {}, [], set()
        self._pos = self._synced = 0

    def _finish_shard(self) -> None:
        self.flush_spans()
        if self.span_copier is not None:  # every span in the file before it is synced or renamed
            self.span_copier.wait()
        f = self._file
        f.write(END_OF_ARCHIVE)
        f.flush()
        # the shard's last bytes and its index go to disk at the same time: the shard's fsync
        # on a bare thread while this one writes and fsyncs the index (one wait instead of two,
        # ~1 ms); both are on disk before either is renamed (not durable: neither waits)
        synced, errors = _thread.allocate_lock(), []
        if self.durable:
            synced.acquire()
            _thread.start_new_thread(self._sync_shard, (f.fileno(), synced, errors))
        size = self._pos + len(END_OF_ARCHIVE)
        iname = index_name(self._name)
        itmp = self.out_dir / (iname + ".tmp")
        try:
            idx = index_bytes(self._name, size, self._json)
            _write_synced(itmp, idx, self.durable)
        except BaseException:
            itmp.unlink(missing_ok=True)
            raise
        finally:
            synced.acquire()  # the thread is done with the file
        if errors:
            itmp.unlink(missing_ok=True)
            raise errors[0]
        f.close()
        self._file = None
        os.replace(itmp, self.out_dir / iname)
        os.replace(self.out_dir / (self._name + ".tmp"), self.out_dir / self._name)
        modes = {m: {"blocks": t[0], "payload_bytes": t[1], "stored_bytes": t[2]}
                 for m, t in sorted(self._modes.items())}  # as index.mode_totals gives them
        self.shards.append(ShardInfo(self._name, iname, checksum(idx), self._count, size, modes))

    def _sync_shard(self, fd: int, done: _thread.LockType, errors: list) -> None:
        try:
            self._stop_syncer()  # the last background sync, and its error
            os.fsync(fd)
        except BaseException as e:  # raised by _finish_shard
            errors.append(e)
        finally:
            done.release()

    def close(self) -> Manifest:
        """Finish the open shard and write the manifest; returns it."""
        if not self.closed:
            if self._file is not None:
                self._finish_shard()
            self.closed = True
        manifest = Manifest(self.shards)
        if self.write_manifest:
            atomic_write(self.out_dir / MANIFEST_NAME, manifest.to_bytes(), self.durable)
        return manifest

    def abort(self) -> None:
        """Drop the open shard's temporary file; finished shards stay."""
        self._span = None
        try:
            self._stop_syncer()
        except OSError:  # the shard is dropped anyway
            pass
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.out_dir / (self._name + ".tmp")).unlink(missing_ok=True)
        self.closed = True
