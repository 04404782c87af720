"""The zstd decompression context each thread keeps (formats/lazy.py ``thread_dctx``)."""

from __future__ import annotations

import os
import threading

import pytest
import zstandard

from blocklm.formats.errors import FormatError
from blocklm.formats.lazy import StoredBlock, decompress, thread_dctx


def _block(raw: bytes, i: int) -> StoredBlock:
    stored = zstandard.ZstdCompressor(level=3, write_content_size=True).compress(raw)
    return StoredBlock.lazy("bytes", (len(raw),), "bytes", {}, stored, len(raw), 1 << 24,
                            ("s.tar", f"k{i}", 0))


def test_one_context_a_thread_reused_across_payloads():
    mine = thread_dctx()
    assert thread_dctx() is mine  # made once, then reused in this thread
    others: list = []
    t = threading.Thread(target=lambda: others.append(thread_dctx()))
    t.start()
    t.join()
    assert others[0] is not mine  # never shared between threads (python-zstandard)


def test_threads_decompressing_at_once_each_get_their_own_payloads():
    raws = [os.urandom(64) * (1 + i % 50) + bytes([i % 256]) * (i * 37) for i in range(400)]
    wrong: list = []
    barrier = threading.Barrier(4)

    def work(offset: int) -> None:
        barrier.wait()
        for j in range(len(raws)):
            i = (j + offset * 97) % len(raws)
            if _block(raws[i], i).payload != raws[i]:
                wrong.append(i)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong


def test_a_bad_frame_leaves_the_threads_context_usable():
    good = b"blocklm " * 1000
    stored = zstandard.ZstdCompressor(write_content_size=True).compress(good)
    bad = stored[:-12] + bytes(12)  # the frame's tail zeroed: does not decompress
    with pytest.raises(FormatError, match="does not decompress|decompressed to") as e:
        decompress(bad, len(good), 1 << 20, shard="s.tar", key="k", block=0)
    assert "s.tar" in str(e.value) and "'k'" in str(e.value)
    assert decompress(stored, len(good), 1 << 20) == good
