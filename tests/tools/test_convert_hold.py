"""Helpers write their own samples where the parent places them (tools/convert_hold.py): write
orders, a helper gone before it wrote, a helper waiting for orders when its parent is gone."""

from __future__ import annotations

import os
import time

import pytest

from blocklm.tools import convert_hold, convert_parallel
from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import run_convert


def test_write_orders_put_the_held_samples_at_their_place(tmp_path):
    """The parent's orders (the shard's descriptor passed with the first one) make the helper
    write its held samples, whole, at the offsets given; wait() returns once they are written
    and sends the next shard's descriptor with the next order."""
    hold = convert_hold.Hold(1 << 16)
    out = convert_hold.HoldWriter(hold, lambda note: None, parent=os.getppid())
    for parts in ([b"ab", b"cd"], [b"efg"], [b"h"]):
        out.held.append((parts, sum(map(len, parts))))
        out.held_bytes += out.held[-1][1]
        out.pos += out.held[-1][1]
    copier = convert_hold.Copier({7: hold}, lambda: [], lambda ready: None)
    shard, other = (os.open(tmp_path / n, os.O_RDWR | os.O_CREAT) for n in ("a", "b"))
    try:
        copier.copy(7, 0, 7, shard, 10)  # two samples into the first shard
        with pytest.raises(RuntimeError, match="out of place"):
            copier.copy(7, 3, 1, shard, 0)  # not where the helper's stream goes on
        out._orders()
        copier.wait()  # written: returns at once
        assert (tmp_path / "a").read_bytes() == b"\0" * 10 + b"abcdefg"
        assert hold.written.value == 7 and out.held_bytes == 1
        copier.copy(7, 7, 1, other, 0)  # the next shard: its descriptor goes with the order
        out._orders()
        assert (tmp_path / "b").read_bytes() == b"h" and out.held_bytes == 0
        hold.ordered.value += 1  # an order for bytes it does not hold: an error, not a hang
        hold.to_helper.sendall(convert_hold._ORDER.pack(3, 1, 0))
        with pytest.raises(RuntimeError, match="stream byte 3"):
            out._orders()
    finally:
        out.finish()
        for fd in (shard, other):
            os.close(fd)
        hold.close()


def test_a_helper_that_dies_before_writing_stops_the_job(audio_dir, small_text, tmp_path,
                                                         monkeypatch):
    """A helper gone after its notes but before it wrote them is an error (the parent never
    waits for it forever, nor leaves a shard with a hole under a final name)."""
    monkeypatch.setattr(convert_hold.HoldWriter, "_write",
                        lambda self, src, size, dst: os._exit(9))
    monkeypatch.setattr(convert_parallel, "MIN_CHUNK", 1)
    monkeypatch.setattr(convert_parallel, "MAX_CHUNK", 2)
    # the parent converts slowly, so the helper surely claims a chunk: in a clean-clone CI run
    # the parent converted all 6 items before the forked helper claimed one (no write, no error)
    parent, process = os.getpid(), convert_parallel.process

    def slow(item, deep_check):
        if os.getpid() == parent:
            time.sleep(0.2)
        return process(item, deep_check)

    monkeypatch.setattr(convert_parallel, "process", slow)
    out = tmp_path / "o"
    with pytest.raises(RuntimeError, match="exit code 9"):
        run_convert([str(small_text), str(audio_dir)], out,
                    ConvertOptions(workers=2, quiet=True))
    assert not [p for p in os.listdir(out) if p.endswith((".tar", ".tmp"))]


def test_a_helper_waiting_for_orders_stops_when_orphaned():
    """A helper waiting for write orders (its hold full, or every chunk claimed) exits once its
    parent is gone (it never hangs)."""
    hold = convert_hold.Hold(1 << 16)
    out = convert_hold.HoldWriter(hold, lambda note: None, parent=os.getppid() + 1)
    out.held.append(([b"x"], 1))
    out.held_bytes = out.pos = 1
    with pytest.raises(SystemExit):
        out._wait(0)
    out.parent = os.getppid()
    out._wait(1)  # holds no more than asked: no wait at all
    hold.close()
