"""A helper's encoded samples stay in its memory until the parent has placed them in a shard;
then the helper writes them into the shard itself.

Each helper has a :class:`Hold`, made by the parent before the fork: a socket pair on which the
parent sends write orders (with the shard's file descriptor, ``SCM_RIGHTS``, the first time an
order goes to a new shard), a shared count of the orders sent, a shared count of the bytes the
helper has written and a pipe on which the helper wakes a parent waiting for them. The helper
converts its chunk (:class:`HoldWriter`), keeps every sample's members as they are (a list of
byte strings) and sends the parent one note per chunk with the samples' summaries. The parent
takes the notes in input order, lays each sample out exactly as for in-process writing
(``ShardWriter.span_packed``) and, at the end of the chunk or of the shard, orders the run of
samples written at its place in the shard (:class:`Copier`, the writer's ``span_copier``); a
shard is synced and renamed only once every order into it is done (``Copier.wait``).

Why not the in-memory ring it replaces (a ``memfd`` the helper filled with ``pwritev``, copied by
the parent into the shard with ``sendfile``): every byte of a helper was copied twice, into
fresh in-memory pages (~0.65 ms per MB here) and out of them again (~0.63 ms per MB, in the
parent, the busier process); written once by the helper it costs ~0.25-0.45 ms per MB, off the
parent's time. Nothing is on disk outside the shards; the held bytes go with the processes.

A sample's bytes are a helper's *stream* position (the bytes it has converted before, in input
order); the parent orders them in stream order. A helper holds at most ``limit`` bytes: before
it would hold more it sends a note for what it has and writes as the orders come (it never waits
with unsent work, so the parent can always go on); a sample larger than ``limit`` is not kept:
its note asks the parent to convert that item itself (the same bytes: encoding is
deterministic). A helper that has claimed everything writes what it still holds, then exits.
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import select
import socket
import struct
from collections import deque
from collections.abc import Callable

from .convert_items import Item, Rejected, encode_item

HELPERS_HOLD = 64 << 20  # what the helpers together may hold before the parent places it
MIN_HOLD = 16 << 20  # one helper's at least
MAX_BUFFERS = 1000  # below IOV_MAX (1024): one pwritev's buffers
PIPE_BYTES = 1 << 20  # the notes' pipe: a helper never waits while the parent is busy
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; named in fcntl from Python 3.10 only on some)
_ORDER = struct.Struct("<qqq")  # stream position, size, offset in the shard


class Hold:
    """A helper's channel with the parent, made by the parent before the fork (both hold it)."""

    def __init__(self, limit: int, ctx=mp) -> None:
        self.limit = limit
        self.to_helper, self.from_parent = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ordered = ctx.RawValue("q", 0)  # orders sent (the helper reads when it moves)
        self.written = ctx.RawValue("q", 0)  # stream bytes the helper has written
        self.wake_r, self.wake_w = os.pipe()  # the helper wakes a waiting parent
        os.set_blocking(self.wake_w, False)  # a full pipe: the parent has wake-ups enough
        self.sent = 0  # the parent's side: stream bytes ordered
        self.fd_sent = -1  # the shard file descriptor the helper has (-1: none yet)
        self.child = None  # the helper process (set by the parent)

    def close(self) -> None:
        self.to_helper.close()
        self.from_parent.close()
        os.close(self.wake_r)
        os.close(self.wake_w)


def widen_pipe(fd: int) -> None:
    """Let the notes' pipe hold ``PIPE_BYTES`` (Linux; elsewhere it stays as it is): a note
    carries its chunk's summaries (~350 bytes a sample), and the parent reads notes only between
    its own chunks."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


class Copier:
    """The parent's side, set as ``ShardWriter.span_copier`` while helpers run: a span's
    ``src_fd`` is the key of a :class:`Hold` in ``holds``. ``drain(conns)`` takes the notes
    waiting on the helpers' pipes (``conns()``) while the parent waits: a helper may be waiting
    to send one before it can write."""

    def __init__(self, holds: dict[int, Hold], conns: Callable[[], list],
                 drain: Callable[[list], None]) -> None:
        self.holds, self.conns, self.drain = holds, conns, drain

    def copy(self, src: int, src_off: int, size: int, dst_fd: int, dst_off: int) -> None:
        """Order ``size`` bytes of helper ``src``'s stream from ``src_off`` written at
        ``dst_off`` of ``dst_fd`` (the open shard); returns at once."""
        h = self.holds[src]
        if src_off != h.sent:  # the helper writes its stream in order: anything else is a bug
            raise RuntimeError(f"conversion helper order out of place: stream byte {src_off}, "
                               f"expected {h.sent}")
        msg = _ORDER.pack(src_off, size, dst_off)
        if h.fd_sent != dst_fd:
            n = socket.send_fds(h.to_helper, [msg], [dst_fd])
            h.fd_sent = dst_fd
            if n < len(msg):  # cut short (never seen): the rest without the descriptor
                h.to_helper.sendall(msg[n:])
        else:
            h.to_helper.sendall(msg)
        h.sent += size
        h.ordered.value += 1

    def wait(self) -> None:
        """Return once every helper has written all that was ordered (before the open shard is
        synced, renamed or left); raise if a helper failed or died first."""
        for h in self.holds.values():
            while h.written.value < h.sent:
                ready = select.select([h.wake_r] + self.conns(), [], [], 1.0)[0]
                if h.wake_r in ready:
                    os.read(h.wake_r, 4096)
                    ready.remove(h.wake_r)
                if h.written.value >= h.sent:
                    # done: a helper's pipe at EOF now is a helper that is exiting, and taking
                    # that EOF waits for its exit (3.3 ms at the end of a sample-corpus run)
                    break
                if ready:
                    self.drain(ready)  # raises a helper's error
                if h.written.value < h.sent and not h.child.is_alive():
                    raise RuntimeError(f"a conversion helper process ended (exit code "
                                       f"{h.child.exitcode}) before writing its samples")
            h.fd_sent = -1  # the next shard's file descriptor goes with the next order


class HoldWriter:
    """The helper's side: converts chunks, holds their bytes, sends their notes and writes the
    bytes when ordered.

    A note is ``(start, end, records, None, None)``: the items ``start..end`` done, with a record
    per item, ``(reason,)`` for a rejected one or ``(size, stream position, key, index template,
    totals, payload bytes)``; ``records`` None asks the parent to convert the items itself (one
    larger than ``limit``)."""

    def __init__(self, hold: Hold, send, parent: int) -> None:
        self.hold, self.send, self.parent = hold, send, parent
        self.pos = 0  # stream bytes converted
        self.done = 0  # stream bytes written
        self.held: deque = deque()  # (members, size) of each sample converted, not yet written
        self.held_bytes = 0
        self.taken = 0  # orders taken
        self.fd = -1  # the shard the last order went to
        self.notes = 0

    def convert(self, start: int, items: list[Item], deep_check: bool) -> None:
        """Convert the items from ``start``; one note at the end (more if the hold fills up and
        the helper has to write before it goes on)."""
        hold, limit = self.hold, self.hold.limit
        ordered, held = hold.ordered, self.held
        a, recs = start, []
        for i, it in enumerate(items, start):
            if ordered.value != self.taken:  # orders between samples: the parent may wait
                self._orders()
            try:
                (parts, n, key, template, totals), payload = encode_item(it, deep_check)
            except Rejected as e:
                recs.append((str(e),))
                continue
            if n > limit:  # never fits: the parent converts it
                self._note(a, i, recs)
                self._note(i, i + 1, None)
                a, recs = i + 1, []
                continue
            if self.held_bytes + n > limit:
                self._note(a, i, recs)
                a, recs = i, []
                self._wait(limit - n)
            held.append((parts, n))
            self.held_bytes += n
            recs.append((n, self.pos, key, template, totals, payload))
            self.pos += n
        self._note(a, start + len(items), recs)

    def finish(self) -> None:
        """Every chunk is claimed: write what is still held as the orders come, then return."""
        self._wait(0)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _note(self, a: int, b: int, recs: list | None) -> None:
        if a < b:
            self.send((a, b, recs, None, None))
            self.notes += 1

    def _wait(self, room: int) -> None:
        """Write as ordered until at most ``room`` bytes are held; an orphan (its parent is
        gone) exits instead."""
        hold = self.hold
        while self.held_bytes > room:
            if hold.ordered.value == self.taken:
                if os.getppid() != self.parent:
                    raise SystemExit(0)
                select.select([hold.from_parent], [], [], 1.0)
            self._orders()

    def _orders(self) -> None:
        """Carry out the orders sent so far, then tell the parent how far the writing is."""
        hold = self.hold
        while hold.ordered.value != self.taken:
            msg, fds, _, _ = socket.recv_fds(hold.from_parent, _ORDER.size, 1)
            while len(msg) < _ORDER.size:  # the rest of a message cut short (never seen)
                more = hold.from_parent.recv(_ORDER.size - len(msg))
                if not more:
                    raise RuntimeError("the parent closed the order channel mid-order")
                msg += more
            self.taken += 1
            if fds:
                if self.fd >= 0:
                    os.close(self.fd)
                self.fd = fds[0]
            self._write(*_ORDER.unpack(msg))
        hold.written.value = self.done
        try:
            os.write(hold.wake_w, b"\0")
        except BlockingIOError:
            pass

    def _write(self, src: int, size: int, dst: int) -> None:
        """Write the held samples ``src..src+size`` of the stream at ``dst`` of the shard."""
        if src != self.done or self.fd < 0:
            raise RuntimeError(f"write order for stream byte {src} (written up to {self.done}, "
                               f"shard {'known' if self.fd >= 0 else 'unknown'})")
        bufs, got, held = [], 0, self.held
        while got < size:
            parts, n = held.popleft()
            bufs += parts
            got += n
        if got != size:
            raise RuntimeError(f"write order of {size} bytes ends inside a sample ({got})")
        self.held_bytes -= size
        at = dst
        for k in range(0, len(bufs), MAX_BUFFERS):
            batch = bufs[k:k + MAX_BUFFERS]
            want = sum(map(len, batch))
            n = os.pwritev(self.fd, batch, at)
            if n != want:  # a short write (a signal, a full disk): the rest from a joined copy
                rest = memoryview(b"".join(batch))
                while n < want:
                    m = os.pwrite(self.fd, rest[n:], at + n)
                    if m <= 0:
                        raise OSError(f"could not write the shard at offset {at + n}")
                    n += m
            at += want
        self.done += size
