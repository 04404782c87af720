"""Parallel conversion with no sample bytes through pipes: the parent works too, helpers spill.

With ``--workers N`` the parent and ``N-1`` forked helper processes claim contiguous chunks of
the input list (a window of it: ``convert_run.WINDOW``) from a shared pair of counters: the parent
from the front, the helpers from the back, until they meet; each claim takes a share of what is
left, so claims shrink as they meet. The
parent converts its chunks in input order straight into the shards (no copy at all). A helper
converts a chunk into a spill file (``OUT/PREFIX-spill-PID.tmp/NNNNNN``: the encoded samples in
order), writes the per-item summaries (source, rejection reason or index entry) beside it
(``NNNNNN.rec``) and sends the parent a short note. Once its front run is done, the parent takes
the helpers' chunks in input order and hands each sample to :meth:`ShardWriter.write_span`, which
sets the shard boundaries exactly as for in-process writing and copies the bytes in the kernel
(``copy_file_range``). So the shards are byte-identical whatever ``N`` and however the chunks were
shared out, and only the helpers' share of the bytes is written twice.

Why not a ``multiprocessing.Pool`` that returns encoded samples (the design before): pickling
~45 MB of samples through pipes to an otherwise idle parent made 2 workers slower than 1 on
2 cores.

Helpers are forked (they inherit the item list; a chunk is claimed by number). Without ``fork``
(Windows) the parent converts everything itself.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import re
import shutil
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

from blocklm.formats.index import BlockInfo, IndexEntry

from .convert_items import Item, Rejected, Result, encode_item, process

MIN_CHUNK = 8  # items: the smallest claim (each helper claim costs a spill file and a note)
MAX_CHUNK = 256  # items: the largest claim; bounds a spill file


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now (the item list, modules) out of garbage collection
    until the block ends (``gc.freeze``). A full collection walks every object: ~15 ms in a
    run of 2,114 files, ~60 ms after a fork, where the walk also copies the pages the helpers
    share with the parent. Nothing is done if the process already froze objects or turned the
    collector off (its state is left as it was)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def spill_dir(out: Path, prefix: str) -> Path:
    """This run's folder of the helpers' spill files, removed at the end. Its name holds the
    process id: a helper orphaned by a ``kill -9`` of its parent can never write into the folder
    of the run that resumes (it stops at its next chunk, and its own folder is gone)."""
    return out / f"{prefix}-spill-{os.getpid()}.tmp"


def stale_spill_dirs(out: Path, prefix: str) -> list[Path]:
    """Spill folders left by crashed runs (any process id)."""
    pat = re.compile(rf"^{re.escape(prefix)}-spill-\d+\.tmp$")
    return [p for p in out.iterdir() if pat.match(p.name)] if out.is_dir() else []


def claim_size(remaining: int, n_workers: int) -> int:
    """Items in the next claim: a share of what is left (guided self-scheduling), so claims
    shrink as the parent and the helpers meet and neither waits long for the other's last one."""
    return min(remaining, max(MIN_CHUNK, min(MAX_CHUNK, remaining // (2 * n_workers))))


def convert_chunk(start: int, items: list[Item], folder: str,
                  deep_check: bool) -> tuple[str, list[tuple]]:
    """Convert one chunk (the window's items from ``start``) into its spill file; returns the
    file's path and, per item, ``(source, error, entry, payload_bytes)`` (``error`` None for a
    converted item)."""
    path = os.path.join(folder, f"{start:09d}")
    records = []
    with open(path, "wb") as f:
        for it in items:
            try:
                parts, entry, payload = encode_item(it, deep_check)
            except Rejected as e:
                records.append((it.source, str(e), None, 0))
                continue
            f.writelines(parts)
            records.append((it.source, None, _flat(entry), payload))
    return path, records


# Index entries cross to the parent as plain tuples: 1.0 us an entry to load and rebuild
# against 1.8 us for the slotted dataclasses themselves (measured on FSDD entries).
def _flat(e: IndexEntry) -> tuple:
    return e.key, e.offset, e.size, [(b.mode, b.shape, b.codec, b.meta, b.size, b.stored, b.zstd,
                                      b.xxh3, b.offset) for b in e.blocks]


def _entry(t: tuple) -> IndexEntry:
    return IndexEntry(t[0], t[1], t[2], [BlockInfo(*b) for b in t[3]])


def _helper(items, n_workers: int, lo, hi, conn, folder: str, deep_check: bool,
            parent: int) -> None:
    """A helper process: claim chunks from the back until the parent's front run meets them."""
    a = -1
    try:
        while os.getppid() == parent:  # an orphan (parent killed) stops
            with lo.get_lock():
                if lo.value >= hi.value:
                    break
                b = hi.value
                a = hi.value = b - claim_size(b - lo.value, n_workers)
            path, records = convert_chunk(a, items[a:b], folder, deep_check)
            # the summaries go through a file and the pipe carries a short note: a pipe holds
            # ~64 KB, and a helper must never wait for the parent, busy with its own chunks
            with open(path + ".rec", "wb") as f:
                pickle.dump(records, f, protocol=pickle.HIGHEST_PROTOCOL)
            conn.send((a, b, path, None))
    except BaseException:  # the parent raises it with the chunk named
        conn.send((a, None, None, traceback.format_exc()))
    finally:
        conn.close()


def parallel_results(items: list[Item], n_workers: int, folder: Path, flush: Callable[[], None],
                     deep_check: bool = False) -> Iterator[Result]:
    """Every item's :class:`Result` in input order, converted by the parent and ``n_workers-1``
    helpers. A result with ``spill = (fd, offset, entry)`` goes to
    :meth:`ShardWriter.write_span`; ``flush`` (the writer's ``flush_spans``) is called before a
    spill file is closed."""
    n = len(items)
    if n_workers <= 1 or n <= MIN_CHUNK or "fork" not in mp.get_all_start_methods():
        yield from (process(it, deep_check) for it in items)
        return
    ctx = mp.get_context("fork")
    lo, hi = ctx.Value("q", 0), ctx.Value("q", n, lock=False)  # hi: under lo's lock
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    helpers: dict = {}  # receiving end -> process
    pending: dict[int, tuple] = {}  # helpers' finished chunks: start -> (end, path, records)
    finished = False
    try:
        for _ in range(n_workers - 1):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_helper, daemon=True, args=(
                items, n_workers, lo, hi, send, str(folder), deep_check, os.getpid()))
            p.start()
            send.close()  # only the helper holds it: its exit shows as EOF here
            helpers[recv] = p
        at = 0  # the parent's front run: items before `at` went straight into the shards
        while True:
            with lo.get_lock():
                if lo.value >= hi.value:
                    break
                a = lo.value
                b = lo.value = a + claim_size(hi.value - a, n_workers)
            yield from (process(it, deep_check) for it in items[a:b])
            at = b
            while any(conn.poll() for conn in helpers):  # take notes as they come
                _receive(helpers, pending, at)
        while at < n:  # the helpers' chunks, in input order
            while at not in pending:
                _receive(helpers, pending, at)
            end, path, records = pending.pop(at)
            yield from _spilled(path, records, flush)
            at = end
        finished = True
    finally:
        for conn, p in helpers.items():
            if finished:  # they have sent everything: let them exit
                p.join(timeout=5)
            if p.is_alive():  # an error or --strict stopped the job: stop them now
                p.kill()
                p.join()
            conn.close()
        shutil.rmtree(folder, ignore_errors=True)


def _receive(helpers: dict, pending: dict, want: int) -> None:
    """Take one message from a helper (waiting for one); raise if a helper failed or died."""
    if not helpers:
        raise RuntimeError(f"conversion helpers exited without converting item {want}")
    for conn in wait(list(helpers)):
        try:
            a, b, path, error = conn.recv()
        except EOFError:  # the helper is gone: fine once it has sent all it claimed
            p = helpers.pop(conn)
            p.join()
            conn.close()
            if p.exitcode != 0:
                raise RuntimeError(f"a conversion helper process died (exit code {p.exitcode}) "
                                   f"before item {want} was converted") from None
            continue
        if error is not None:
            raise RuntimeError(f"a conversion helper failed on the chunk at item {a}:\n{error}")
        with open(path + ".rec", "rb") as f:  # written by our own helper, not input data
            pending[a] = (b, path, pickle.load(f))
        os.unlink(path + ".rec")


def _spilled(path: str, records: list[tuple], flush: Callable[[], None]) -> Iterator[Result]:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for source, error, entry, payload in records:
            if error is not None:
                yield Result(source, error=error)
                continue
            entry = _entry(entry)
            yield Result(source, payload_bytes=payload, spill=(fd, offset, entry))
            offset += entry.size
        flush()
    finally:
        os.close(fd)
        os.unlink(path)
