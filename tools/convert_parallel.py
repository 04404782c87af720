"""Parallel conversion with no sample bytes through pipes: the parent works too, helpers write
their samples into the shards themselves, where the parent places them.

With ``--workers N`` the parent and ``N-1`` forked helper processes claim contiguous chunks of
the input list (a window of it: ``convert_run.WINDOW``) in input order from one shared counter;
each claim takes a share of what is left, so claims shrink towards the end and nobody waits long
for the last one. A helper converts its chunk, keeps the bytes (``convert_hold``) and sends the
parent a note with the per-item summaries (the rejection reason, or size, place in its stream,
key, index text and per-mode totals). The parent yields every result in input order: its own
chunk straight into the shards when it is the next one, else held in memory until the chunks
before it are written (at most ``HOLD_BYTES``, beyond which it waits for the helpers instead of
claiming more); a helper's chunk, as soon as it is the next one, through
:meth:`ShardWriter.span_packed`, which sets the shard boundaries exactly as for in-process
writing; the helper is then ordered to write those bytes at their place (``Copier``). So the
shards are byte-identical whatever ``N`` and however the chunks were shared out, and each byte
is written once, by the process that made it.

Why not a ``multiprocessing.Pool`` that returns encoded samples (the design before the spill
files): pickling ~45 MB of samples through pipes to an otherwise idle parent made 2 workers
slower than 1 on 2 cores. The summaries do go through the pipe (pickled by multiprocessing): they
come from this run's own forked helper and never touch the disk.

Helpers are forked (they inherit the item list; a chunk is claimed by number). Without ``fork``
(Windows) the parent converts everything itself.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import re
import signal
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import wait
from pathlib import Path

from .convert_hold import HELPERS_HOLD, MIN_HOLD, Copier, Hold, HoldWriter, widen_pipe
from .convert_items import Item, Result, process

MIN_CHUNK = 8  # items: the smallest claim (each helper claim costs a note)
MAX_CHUNK = 256  # items: the largest claim
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


def stale_spill_dirs(out: Path, prefix: str) -> list[Path]:
    """Spill folders (``PREFIX-spill-PID.tmp``) left by crashed runs of an older design
    (helpers wrote their chunks there)."""
    pat = re.compile(rf"^{re.escape(prefix)}-spill-\d+\.tmp$")
    return [p for p in out.iterdir() if pat.match(p.name)] if out.is_dir() else []


def claim_size(remaining: int, n_workers: int) -> int:
    """Items in the next claim: a share of what is left (guided self-scheduling), so claims
    shrink towards the end and nobody waits long for another's last one."""
    return min(remaining, max(MIN_CHUNK, min(MAX_CHUNK, remaining // (2 * n_workers))))


def claim(nxt, n: int, n_workers: int) -> tuple[int, int] | None:
    """The next chunk ``(start, end)`` of the ``n`` items from the shared counter ``nxt``, or
    None when every item is claimed."""
    with nxt.get_lock():
        a = nxt.value
        if a >= n:
            return None
        b = nxt.value = a + claim_size(n - a, n_workers)
    return a, b


def _helper(items, n_workers: int, nxt, conn, hold: Hold, deep_check: bool,
            parent: int) -> None:
    """A helper process: claim chunks in order until none is left, then write what it holds as
    the parent orders it."""
    a = -1
    try:
        out = HoldWriter(hold, conn.send, parent)
        while os.getppid() == parent:  # an orphan (parent killed) stops
            chunk = claim(nxt, len(items), n_workers)
            if chunk is None:
                out.finish()
                break
            a, b = chunk
            out.convert(a, items[a:b], deep_check)
    except BaseException:  # the parent raises it with the chunk named
        conn.send((a, None, None, None, traceback.format_exc()))
    finally:
        conn.close()


def parallel_results(items: list[Item], n_workers: int, writer,
                     deep_check: bool = False) -> Iterator[Result]:
    """Every item's :class:`Result` in input order, converted by the parent and ``n_workers-1``
    helpers. A result with ``spill = (hold, position, size, key, template, totals)`` goes to
    ``writer.span_packed`` (a :class:`ShardWriter`); the writer's ``flush_spans`` is called at
    the end of each helper's chunk, which orders the helper to write it (``span_copier``, set
    while the helpers run). Returns once the helpers have written everything."""
    n = len(items)
    if n_workers <= 1 or n <= MIN_CHUNK or "fork" not in mp.get_all_start_methods():
        yield from (process(it, deep_check) for it in items)
        return
    ctx = mp.get_context("fork")
    _reap_retired()
    nxt = ctx.Value("q", 0)
    helpers: dict = {}  # receiving end -> (process, hold)
    holds: dict[int, Hold] = {}  # a span's source -> its helper's hold
    pending: dict[int, tuple] = {}  # helpers' finished chunks: start -> (end, records, hold)
    held: dict[int, tuple] = {}  # the parent's chunks waiting for their turn: start -> (end, results)
    held_bytes = 0
    finished = False
    limit = max(MIN_HOLD, HELPERS_HOLD // (n_workers - 1))
    flush = writer.flush_spans
    at = 0  # items before `at` are yielded

    def drain(ready: list) -> None:  # the notes that came while the parent waits for writes
        if live := [c for c in ready if c in helpers]:
            _receive(helpers, pending, at, live)

    try:
        for _ in range(n_workers - 1):
            hold = Hold(limit, ctx)
            holds[hold.wake_r] = hold  # closed in `finally`
            recv, send = ctx.Pipe(duplex=False)
            widen_pipe(send.fileno())
            hold.child = p = Child(_helper, (items, n_workers, nxt, send, hold, deep_check,
                                             os.getpid()))
            helpers[recv] = (p, hold)
            send.close()  # only the helper holds it: its exit shows as EOF here
        writer.span_copier = copier = Copier(holds, lambda: list(helpers), drain)
        while at < n:
            if at in held:
                end, results = held.pop(at)
                held_bytes -= _bytes(results)
                yield from results
                at = end
            elif at in pending:
                end, records, hold = pending.pop(at)
                if records is None:  # an item larger than the helper's hold
                    yield from (process(it, deep_check) for it in items[at:end])
                else:
                    yield from _spilled(items, at, records, hold.wake_r, flush)
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
        copier.wait()  # the helpers' last writes, before their holds are closed
        finished = True
    finally:
        writer.span_copier = None
        for conn, (p, _) in helpers.items():
            # finished: every chunk is in, a helper's last act is to find nothing left and exit;
            # it is reaped later (`_reap_retired` when the next window starts, `join_retired`;
            # a process that ends first leaves it to init) instead of waited for here, which took
            # 0.1-28 ms of wall time on two busy cores (the helper has to be scheduled to exit)
            if not finished and p.is_alive():  # an error or --strict stopped the job: stop them
                p.kill()
                p.join()
            conn.close()
        for hold in holds.values():
            hold.close()
        if finished:
            _RETIRED.append((nxt, [p for p, _ in helpers.values()]))


class Child:
    """A helper process: ``target(*args)`` in a child made by ``os.fork`` (never returns there).

    Not ``multiprocessing.Process``: its start and bootstrap cost ~0.4-1 ms more in the parent
    (on the conversion's critical path) and ~0.6-1.3 ms more in the child. ``is_alive``,
    ``join``, ``kill`` and ``exitcode`` as there; the pipe and counter still come from
    multiprocessing."""

    def __init__(self, target: Callable, args: tuple) -> None:
        self.exitcode: int | None = None
        self.pid = os.fork()
        if self.pid == 0:  # the child: never back into the parent's frames
            code = 1
            try:
                target(*args)
                code = 0
            finally:
                os._exit(code)

    def _reap(self, flags: int) -> None:
        if self.exitcode is None:
            try:
                pid, status = os.waitpid(self.pid, flags)
            except ChildProcessError:  # its status goes elsewhere (SIGCHLD ignored, a reaper):
                while _exists(self.pid):  # alive while its pid is
                    if flags:
                        return
                    time.sleep(0.001)
                self.exitcode = 0  # unknown; work it left undone is still found missing
                return
            if pid:
                self.exitcode = os.waitstatus_to_exitcode(status)

    def is_alive(self) -> bool:
        self._reap(os.WNOHANG)
        return self.exitcode is None

    def join(self) -> None:
        self._reap(0)

    def kill(self) -> None:
        if self.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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


def _receive(helpers: dict, pending: dict, want: int, ready: list | None = None) -> None:
    """Take one note from each helper with one waiting (``ready``: the pipes known to be
    readable; else wait for one); raise if a helper failed or died."""
    if not helpers:
        raise RuntimeError(f"conversion helpers exited without converting item {want}")
    for conn in ready or wait(list(helpers)):
        try:
            a, b, records, pos, error = conn.recv()
        except EOFError:  # the helper is gone: fine once it has sent all it claimed
            p, _ = helpers.pop(conn)
            p.join()
            conn.close()  # its hold stays open until the window ends
            if p.exitcode != 0:
                raise RuntimeError(f"a conversion helper process died (exit code {p.exitcode}) "
                                   f"before item {want} was converted") from None
            continue
        if error is not None:
            raise RuntimeError(f"a conversion helper failed on the chunk at item {a}:\n{error}")
        pending[a] = (b, records, helpers[conn][1])


def _spilled(items: list[Item], start: int, records: list[tuple], fd: int,
             flush: Callable[[], None]) -> Iterator[Result]:
    """The results of a helper's chunk from its records (``fd``: the key of its hold); the
    bytes stay with the helper until ``flush`` (the writer's ``flush_spans``) orders them
    written."""
    for it, rec in zip(items[start:start + len(records)], records):
        if len(rec) == 1:
            yield Result(it.source, error=rec[0])
        else:
            size, offset, key, template, totals, payload = rec
            yield Result(it.source, None, payload, None, (fd, offset, size, key, template, totals))
    flush()
