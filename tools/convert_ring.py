"""A helper's encoded samples handed to the parent through memory: a ring in an in-memory file.

Each helper has its own ring: an anonymous in-memory file (``memfd_create``; an unlinked
temporary file where there is none), a shared counter of the bytes the parent has consumed and a
pipe on which the parent wakes a helper waiting for room. A helper writes its samples' bytes
into the ring (``os.pwritev``, batched) and sends the parent one note per chunk with the samples'
summaries; the parent copies the bytes from the ring into the shard in the kernel
(``ShardWriter.span_packed``: ``sendfile``) and then gives the room back (:meth:`Ring.release`).

Why not spill files in the output folder (the design before): a file created, filled through
ext4 and unlinked per chunk cost the helper ~0.33 ms per MB to write (a reused in-memory page:
~0.09) and the parent ~0.1-0.25 ms per unlink, with a summary file beside each; a crash left a
folder to clean up, where the memory here goes with the processes.

Positions are absolute byte counts (ever growing); a sample lies at ``position % size`` and never
wraps: one that would cross the end starts again at 0. A helper writes at ``t`` only once the
parent has consumed every byte that lay there before (``consumed >= min(pos, t + n - size)``),
and before it waits it sends a note for what it has written so far, so the parent, which takes
the notes in input order, can always go on. A sample larger than the ring is not written: its
note asks the parent to convert that item itself (the same bytes: encoding is deterministic).
"""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
import select
import tempfile

from .convert_items import Item, Rejected, encode_item

RING_BYTES = 64 << 20  # the rings of all helpers together (allocated as written, reused)
MIN_RING = 16 << 20  # one helper's ring at least
FLUSH_BYTES = 1 << 20  # a helper's samples written into its ring in batches of about this much
MAX_BUFFERS = 1000  # below IOV_MAX (1024): one pwritev's buffers
PIPE_BYTES = 1 << 20  # the notes' pipe: a helper never waits while the parent is busy
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Linux; named in fcntl from Python 3.10 only on some)


class Ring:
    """A helper's ring, created by the parent before the fork (both sides hold the same)."""

    def __init__(self, size: int, ctx=mp) -> None:
        self.size = size
        try:
            self.fd = os.memfd_create("blocklm-convert", os.MFD_CLOEXEC)
        except (AttributeError, OSError):  # an unlinked file: gone with the processes as well
            f = tempfile.TemporaryFile()
            self.fd = os.dup(f.fileno())
            f.close()
        self.consumed = ctx.RawValue("q", 0)  # bytes the parent has copied out (absolute)
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)  # the parent never waits on a full wake pipe

    def release(self, pos: int) -> None:
        """The parent: every byte before ``pos`` is copied out; wake the helper if it waits."""
        self.consumed.value = pos
        try:
            os.write(self.wake_w, b"\0")
        except BlockingIOError:  # full: the helper has wake-ups enough waiting
            pass

    def close(self) -> None:
        for fd in (self.fd, self.wake_r, self.wake_w):
            os.close(fd)


def widen_pipe(fd: int) -> None:
    """Let the notes' pipe hold ``PIPE_BYTES`` (Linux; elsewhere it stays as it is): a note
    carries its chunk's summaries (~350 bytes a sample), and the parent reads notes only between
    its own chunks."""
    try:
        fcntl.fcntl(fd, _F_SETPIPE_SZ, PIPE_BYTES)
    except OSError:
        pass


class RingWriter:
    """The helper's side: converts chunks into the ring and sends their notes.

    A note is ``(start, end, records, pos, None)``: the items ``start..end`` done, with a record
    per item, ``(reason,)`` for a rejected one or ``(size, offset in the ring, key, index
    template, totals, payload bytes)``, and ``pos`` the ring position after them; ``records``
    None asks the parent to convert the items itself (one larger than the ring)."""

    def __init__(self, ring: Ring, send, parent: int) -> None:
        self.ring, self.send, self.parent = ring, send, parent
        self.pos = 0
        self.buf: list[bytes] = []
        self.buf_at = self.buf_len = 0
        self.notes = 0

    def convert(self, start: int, items: list[Item], deep_check: bool) -> None:
        """Convert the items from ``start`` into the ring; one note at the end (more if the ring
        fills up and the helper has to wait for the parent)."""
        size, a, recs = self.ring.size, start, []
        for i, it in enumerate(items, start):
            try:
                (parts, n, key, template, totals), payload = encode_item(it, deep_check)
            except Rejected as e:
                recs.append((str(e),))
                continue
            if n > size:  # never fits: the parent converts it
                self._note(a, i, recs)
                self._note(i, i + 1, None)
                a, recs = i + 1, []
                continue
            pos = self.pos
            x = pos % size
            t = pos if x + n <= size else pos + size - x
            if self.ring.consumed.value < min(pos, t + n - size):
                self._note(a, i, recs)
                a, recs = i, []
                self._wait(min(pos, t + n - size))
            if t != pos or self.buf_len >= FLUSH_BYTES or len(self.buf) >= MAX_BUFFERS:
                self._flush()
            if not self.buf:
                self.buf_at = t % size
            self.buf += parts
            self.buf_len += n
            recs.append((n, t % size, key, template, totals, payload))
            self.pos = t + n
        self._note(a, start + len(items), recs)

    def _note(self, a: int, b: int, recs: list | None) -> None:
        if a < b:
            self._flush()  # the bytes are in the ring before the parent hears of them
            self.send((a, b, recs, self.pos, None))
            self.notes += 1

    def _flush(self) -> None:
        if not self.buf:
            return
        n = os.pwritev(self.ring.fd, self.buf, self.buf_at)
        if n != self.buf_len:  # a short write (a signal): the rest from a joined copy
            rest = memoryview(b"".join(self.buf))
            while n < self.buf_len:
                n += os.pwrite(self.ring.fd, rest[n:], self.buf_at + n)
        self.buf, self.buf_len = [], 0

    def _wait(self, need: int) -> None:
        """Wait until the parent has consumed ``need`` bytes; an orphan (its parent is gone)
        exits instead."""
        ring = self.ring
        while ring.consumed.value < need:
            if os.getppid() != self.parent:
                raise SystemExit(0)
            if select.select([ring.wake_r], [], [], 1.0)[0]:
                os.read(ring.wake_r, 4096)
