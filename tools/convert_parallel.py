"""Parallel conversion with no sample bytes through pipes: the parent works too, helpers spill.

With ``--workers N`` the parent and ``N-1`` forked helper processes claim contiguous chunks of
the input list (a window of it: ``convert_run.WINDOW``) in input order from one shared counter;
each claim takes a share of what is left, so claims shrink towards the end and nobody waits long
for the last one. A helper converts its chunk into a spill file
(``OUT/PREFIX-spill-PID.tmp/NNNNNNNNN``: the encoded samples in order), writes the per-item
summaries (source, and the rejection reason or size, key, index text and per-mode totals)
beside it (``.rec``) and sends the parent a short note. The parent yields every result in input
order: its own chunk straight into the shards when it is the next one, else held in memory
until the chunks before it are written (at most ``HOLD_BYTES``, beyond which it waits for the
helpers instead of claiming more); a helper's chunk, as soon as it is the next one, through
:meth:`ShardWriter.span_packed`, which sets the shard boundaries exactly as for in-process
writing and copies the bytes in the kernel (``copy_file_range``). So the shards are
byte-identical whatever ``N`` and however the chunks were shared out, only the helpers' share of
the bytes is written twice, and the copies are spread over the run instead of left to its end
(the helpers used to claim from the back, which left the parent copying all their chunks alone
after the meeting point).

Why not a ``multiprocessing.Pool`` that returns encoded samples (the design before): pickling
~45 MB of samples through pipes to an otherwise idle parent made 2 workers slower than 1 on
2 cores.

Helpers are forked (they inherit the item list; a chunk is claimed by number). Without ``fork``
(Windows) the parent converts everything itself.
"""

from __future__ import annotations

import gc
import json
import multiprocessing as mp
import os
import re
import shutil
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

from blocklm.formats.writer import WRITE_BUFFER

from .convert_items import Item, Rejected, Result, encode_item, process

MIN_CHUNK = 8  # items: the smallest claim (each helper claim costs a spill file and a note)
MAX_CHUNK = 256  # items: the largest claim; bounds a spill file
HOLD_BYTES = 64 << 20  # the parent's converted chunks held in memory, waiting for their turn


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Leave the objects that exist now (the item list, modules) out of garbage collection
    until the block ends (``gc.freeze``), and collect the young generation only every
    ``GC_YOUNG`` net allocations instead of 700. A full collection walks every object: ~15 ms
    in a run of 2,114 files, ~60 ms after a fork, where the walk also copies the pages the
    helpers share with the parent; the young collections cost ~2-5 ms a run (26 of them, the
    index entries kept until their shard closes promoted again and again), and with the higher
    threshold none runs. Nothing is done if the process already froze objects or turned the
    collector off (its state is left as it was)."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield
        return
    threshold = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(max(threshold[0], GC_YOUNG), *threshold[1:])
    try:
        yield
    finally:
        gc.set_threshold(*threshold)
        gc.unfreeze()


GC_YOUNG = 20_000


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
    shrink towards the end and nobody waits long for another's last one."""
    return min(remaining, max(MIN_CHUNK, min(MAX_CHUNK, remaining // (2 * n_workers))))


def convert_chunk(start: int, items: list[Item], folder: str,
                  deep_check: bool) -> tuple[str, list[tuple]]:
    """Convert one chunk (the window's items from ``start``) into its spill file; returns the
    file's path and, per item, ``(source, error, size, key, index template, totals,
    payload_bytes)`` (``error`` None for a converted item; see ``ShardWriter.write_packed``)."""
    path = os.path.join(folder, f"{start:09d}")
    records = []
    with open(path, "wb", buffering=WRITE_BUFFER) as f:
        write = f.writelines
        for it in items:
            try:
                (parts, size, key, template, totals), payload = encode_item(it, deep_check)
            except Rejected as e:
                records.append((it.source, str(e), 0, None, None, None, 0))
                continue
            write(parts)
            records.append((it.source, None, size, key, template, totals, payload))
    return path, records


def write_records(path: str, records: list[tuple]) -> None:
    """Store a chunk's per-item summaries (strings, ints, None and tuples of them) as JSON:
    the spill folder lies in the output folder, so nothing read back from it may run code, as
    unpickling would. Lone surrogates (undecodable file names) survive the round trip.
    ``json.dumps`` and one write: ``json.dump`` encodes in pure Python (its C encoder is used by
    ``dumps`` only) and writes piece by piece, ~1 ms per 90-item chunk against ~0.1 ms."""
    text = json.dumps(records, separators=(",", ":"))
    with open(path, "w", encoding="ascii") as f:
        f.write(text)


def read_records(path: str) -> list[list]:
    """The summaries :func:`write_records` stored (tuples come back as lists)."""
    with open(path, encoding="ascii") as f:
        return json.load(f)


def claim(nxt, n: int, n_workers: int) -> tuple[int, int] | None:
    """The next chunk ``(start, end)`` of the ``n`` items from the shared counter ``nxt``, or
    None when every item is claimed."""
    with nxt.get_lock():
        a = nxt.value
        if a >= n:
            return None
        b = nxt.value = a + claim_size(n - a, n_workers)
    return a, b


def _helper(items, n_workers: int, nxt, conn, folder: str, deep_check: bool,
            parent: int) -> None:
    """A helper process: claim chunks in order until none is left."""
    a = -1
    try:
        while os.getppid() == parent:  # an orphan (parent killed) stops
            chunk = claim(nxt, len(items), n_workers)
            if chunk is None:
                break
            a, b = chunk
            path, records = convert_chunk(a, items[a:b], folder, deep_check)
            # the summaries go through a file and the pipe carries a short note: a pipe holds
            # ~64 KB, and a helper must never wait for the parent, busy with its own chunks
            write_records(path + ".rec", records)
            conn.send((a, b, path, None))
    except BaseException:  # the parent raises it with the chunk named
        conn.send((a, None, None, traceback.format_exc()))
    finally:
        conn.close()


def parallel_results(items: list[Item], n_workers: int, folder: Path, flush: Callable[[], None],
                     deep_check: bool = False) -> Iterator[Result]:
    """Every item's :class:`Result` in input order, converted by the parent and ``n_workers-1``
    helpers. A result with ``spill = (fd, offset, size, key, template, totals)`` goes to
    :meth:`ShardWriter.span_packed`; ``flush`` (the writer's ``flush_spans``) is called before a
    spill file is closed."""
    n = len(items)
    if n_workers <= 1 or n <= MIN_CHUNK or "fork" not in mp.get_all_start_methods():
        yield from (process(it, deep_check) for it in items)
        return
    ctx = mp.get_context("fork")
    _reap_retired()
    nxt = ctx.Value("q", 0)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    helpers: dict = {}  # receiving end -> process
    pending: dict[int, tuple] = {}  # helpers' finished chunks: start -> (end, path, records)
    held: dict[int, tuple] = {}  # the parent's chunks waiting for their turn: start -> (end, results)
    held_bytes = 0
    finished = False
    try:
        for _ in range(n_workers - 1):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_helper, daemon=True, args=(
                items, n_workers, nxt, send, str(folder), deep_check, os.getpid()))
            p.start()
            send.close()  # only the helper holds it: its exit shows as EOF here
            helpers[recv] = p
        at = 0  # items before `at` are yielded
        while at < n:
            if at in held:
                end, results = held.pop(at)
                held_bytes -= _bytes(results)
                yield from results
                at = end
            elif at in pending:
                end, path, records = pending.pop(at)
                yield from _spilled(path, records, flush)
                at = end
            elif any(conn.poll() for conn in helpers):  # take notes as they come
                _receive(helpers, pending, at)
            else:  # the next chunk is not ready: convert another one, or wait for it
                chunk = claim(nxt, n, n_workers) if held_bytes < HOLD_BYTES or \
                    nxt.value == at else None
                if chunk is None:
                    _receive(helpers, pending, at)
                elif chunk[0] == at:  # the next one: straight into the shards
                    yield from (process(it, deep_check) for it in items[chunk[0]:chunk[1]])
                    at = chunk[1]
                else:
                    results = [process(it, deep_check) for it in items[chunk[0]:chunk[1]]]
                    held[chunk[0]] = (chunk[1], results)
                    held_bytes += _bytes(results)
        finished = True
    finally:
        for conn, p in helpers.items():
            # finished: every chunk is in, a helper's last act is to find nothing left and exit;
            # it is reaped later (multiprocessing polls its children when it starts the next
            # one, and at exit) instead of waited for here, which took 0.1-28 ms of wall time
            # on two busy cores (the helper has to be scheduled to exit)
            if not finished and p.is_alive():  # an error or --strict stopped the job: stop them
                p.kill()
                p.join()
            conn.close()
        if finished:
            _RETIRED.append((nxt, list(helpers.values())))
        shutil.rmtree(folder, ignore_errors=True)


# Counters of finished windows whose helpers may still be exiting (not waited for). A helper
# reads its counter once more before it exits; were the counter freed, the next window's could
# take its place in multiprocessing's shared heap, and that late read would claim the new
# window's first chunk for a helper that converts nothing of it (a real failure, seen once in
# 20 runs of tests/tools/test_convert_parallel.py). So a counter lives until its helpers are gone.
_RETIRED: list[tuple] = []


def _reap_retired() -> None:
    """Forget the retired counters whose helpers have exited (``is_alive`` reaps them)."""
    _RETIRED[:] = [(v, ps) for v, ps in _RETIRED if any(p.is_alive() for p in ps)]


def join_retired() -> None:
    """Wait for the helpers of finished conversions to exit (a benchmark counts their CPU time
    in the conversion that used them)."""
    for _, procs in _RETIRED:
        for p in procs:
            p.join()
    _RETIRED.clear()


def _bytes(results: list[Result]) -> int:
    return sum(r.encoded[1] for r in results if r.encoded is not None)


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
        pending[a] = (b, path, read_records(path + ".rec"))
        os.unlink(path + ".rec")


def _spilled(path: str, records: list[tuple], flush: Callable[[], None]) -> Iterator[Result]:
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        for source, error, size, key, template, totals, payload in records:
            if error is not None:
                yield Result(source, error=error)
                continue
            yield Result(source, None, payload, None, (fd, offset, size, key, template, totals))
            offset += size
        flush()
    finally:
        os.close(fd)
        os.unlink(path)
