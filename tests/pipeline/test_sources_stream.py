"""Remote runs received into reused buffers (pipeline/buffers.py, HTTPSource.readinto): one range
request per stretch of neighbouring runs, each run taken from the answer already under way;
a cut or stalled answer resumes at the first missing byte or times out; a buffer is never
written again while a payload view of it lives; the read-ahead thread keeps its connection
from pass to pass and closes it when its dataset goes."""

from __future__ import annotations

import gc
import mmap
import pickle
import random
import re
import shutil
import threading
import time
import warnings

import pytest

from blocklm.formats import Sample, ShardWriter, bytes_block, iter_dataset
from blocklm.formats.lazy import ViewBlock
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener, RetryPolicy, SourceError
from blocklm.pipeline.buffers import RunBuffers

FAST_RETRY = RetryPolicy(retries=4, backoff=0.01, max_backoff=0.05, deadline=20)


def _ranges(proxy, name: str) -> list[tuple[int, int]]:
    """The ranges asked for ``name`` through ``proxy``, in order."""
    out = []
    for r in proxy.requests:
        if name.encode() in r and (m := re.search(rb"Range: bytes=(\d+)-(\d+)", r)):
            out.append((int(m.group(1)), int(m.group(2))))
    return out


@pytest.fixture(scope="module")
def big_url(nginx, tmp_path_factory):
    """60 samples of 100 KB random payloads (handed out as views) in shards of 40 (4 MB: several
    runs each), served by nginx; the local folder too."""
    src = tmp_path_factory.mktemp("stream") / "big"
    with ShardWriter(src, max_samples=40) as w:
        for i in range(60):
            data = random.Random(i).randbytes(100_000)  # incompressible: stored as it is
            w.write(Sample(f"k{i:03d}", [bytes_block("raw", (100_000,), data)]))
    shutil.copytree(src, nginx.root / "stream-big")
    return f"{nginx.url}/stream-big", src


def test_one_request_serves_the_runs_that_follow(nginx, small_shards, fault_proxy):
    proxy = fault_proxy(nginx.port)
    shutil.copytree(small_shards, nginx.root / "stream-small", dirs_exist_ok=True)
    name = "shard-000001.tar"
    data = (small_shards / name).read_bytes()
    src = RemoteOpener(RemoteConfig(timeout=5))(f"{proxy.url}/stream-small/{name}")
    buf = bytearray(len(data))
    parts = [(512, 3000), (3000, 3001), (3001, 9000), (9000, len(data))]
    for a, b in parts:
        src.readinto(a, memoryview(buf)[a:b], until=len(data))
    assert bytes(buf[512:]) == data[512:]
    assert _ranges(proxy, name) == [(512, len(data) - 1)]  # one request for all four
    src.readinto(100, memoryview(buf)[100:200])  # not where the answer went on: a new one
    assert _ranges(proxy, name)[-1] == (100, 199) and bytes(buf[100:200]) == data[100:200]
    assert src.retries == 0 and proxy.connections == 1


def test_a_streamed_answer_cut_short_resumes_at_the_first_missing_byte(nginx, small_shards,
                                                                       fault_proxy):
    proxy = fault_proxy(nginx.port)
    shutil.copytree(small_shards, nginx.root / "stream-small", dirs_exist_ok=True)
    name = "shard-000002.tar"
    data = (small_shards / name).read_bytes()
    proxy.add("cut", after=12_000)  # the headers, then part of the second read's bytes
    src = RemoteOpener(RemoteConfig(timeout=2, retry=FAST_RETRY))(
        f"{proxy.url}/stream-small/{name}")
    buf = bytearray(len(data))
    for a, b in ((0, 5000), (5000, 20_000), (20_000, len(data))):
        src.readinto(a, memoryview(buf)[a:b], until=len(data))
    assert bytes(buf) == data
    ranges = _ranges(proxy, name)
    assert ranges[0] == (0, len(data) - 1) and len(ranges) == 2
    assert 5000 < ranges[1][0] < 12_000 and ranges[1][1] == len(data) - 1
    assert src.retries == 1


def test_a_stalled_streamed_answer_times_out_and_resumes(nginx, small_shards, fault_proxy):
    proxy = fault_proxy(nginx.port)
    shutil.copytree(small_shards, nginx.root / "stream-small", dirs_exist_ok=True)
    name = "shard-000003.tar"
    data = (small_shards / name).read_bytes()
    proxy.add("stall", after=6000, seconds=20, times=3)  # each answer stalls after ~5.7 KB
    src = RemoteOpener(RemoteConfig(timeout=0.3, retry=RetryPolicy(retries=2, backoff=0.01)))(
        f"{proxy.url}/stream-small/{name}")
    buf = bytearray(len(data))
    src.readinto(0, memoryview(buf)[:1000], until=len(data))  # arrives before the stall
    t = time.monotonic()
    src.readinto(1000, memoryview(buf)[1000:], until=len(data))
    # each stall waited out once (the bytes before it count as progress, so no give-up)
    assert 0.9 <= time.monotonic() - t < 10
    assert bytes(buf) == data and src.retries == 3
    starts = [a for a, _ in _ranges(proxy, name)]
    assert starts[0] == 0 and all(x < y for x, y in zip(starts, starts[1:])) and len(starts) == 4


def test_a_stall_without_progress_gives_up_naming_the_shard(nginx, small_shards, fault_proxy):
    proxy = fault_proxy(nginx.port)
    shutil.copytree(small_shards, nginx.root / "stream-small", dirs_exist_ok=True)
    name = "shard-000003.tar"
    size = (small_shards / name).stat().st_size
    proxy.add("stall", after=6000, seconds=20)
    proxy.add("stall", after=0, seconds=20, times=3)  # the retries: not even the headers
    src = RemoteOpener(RemoteConfig(timeout=0.3, retry=RetryPolicy(retries=2, backoff=0.01)))(
        f"{proxy.url}/stream-small/{name}")
    buf = bytearray(size)
    src.readinto(0, memoryview(buf)[:5000], until=size)
    t = time.monotonic()
    with pytest.raises(SourceError) as e:
        src.readinto(5000, memoryview(buf)[5000:], until=size)
    assert time.monotonic() - t < 5
    assert name in str(e.value) and "timed out" in str(e.value)


def test_dataset_reads_each_stretch_with_one_request_and_keeps_its_connection(
        nginx, big_url, fault_proxy):
    proxy = fault_proxy(nginx.port)
    url, local = big_url
    ds = BlockDataset(url.replace(nginx.url, proxy.url), shuffle=False,
                      remote=RemoteConfig(timeout=5))
    want = list(iter_dataset(local))
    for _ in range(3):
        assert list(ds) == want
    # one per pass, though each is several runs; the first shard's once more: after each pass
    # the first run of the next one is read ahead (taken by passes 2 and 3, the last unused;
    # read by the helper thread after the pass: waited for, the thread's reads run in order)
    ds._reads.submit(lambda: None).result(timeout=10)
    assert [len(_ranges(proxy, s)) for s in ("shard-000000.tar", "shard-000001.tar")] == [4, 3]
    # the read-ahead thread's connections (the second one carries the request sent ahead while
    # the first still carries a body) are kept from pass to pass, and the main thread's
    assert proxy.connections <= 3


def test_a_buffer_is_not_reused_while_a_payload_view_of_it_lives(big_url):
    url, local = big_url
    ds = BlockDataset(url, shuffle=False, remote=RemoteConfig(timeout=5))
    kept = list(ds)  # every sample held: their views pin their runs' buffers
    assert all(isinstance(s.blocks[0], ViewBlock) for s in kept)
    for _ in range(2):
        for _s in ds:  # more runs received meanwhile, into other buffers
            pass
    assert kept == list(iter_dataset(local))


def test_run_buffers_reuse_only_unreferenced_buffers():
    bufs = RunBuffers(1 << 16, keep=2)
    a = bufs.take(1000)
    first = id(a)
    view = memoryview(a)[10:20]  # as a payload view handed out
    bufs.give(a)
    del a
    b = bufs.take(1000)
    assert id(b) != first  # the view of the first one lives: a new one
    second = id(b)
    bufs.give(b)
    del b
    assert id(bufs.take(1000)) == second
    view.release()
    del view
    assert id(bufs.take(1000)) == first  # its view gone: reused
    big = bufs.take((1 << 16) + 1)  # a run above the size: its own buffer, not kept
    assert isinstance(big, mmap.mmap) and len(big) > 1 << 16
    bufs.give(big)
    assert all(len(x) == 1 << 16 for x in bufs._free)
    copy = pickle.loads(pickle.dumps(bufs))  # a DataLoader worker's: no buffers, its own lock
    assert copy.size == 1 << 16 and not copy._free and len(copy.take(10)) == 1 << 16


def test_the_read_ahead_thread_ends_and_closes_its_connection_with_its_dataset(big_url):
    url, local = big_url

    def threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name.startswith("blocklm-read")]

    before = set(threads())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", ResourceWarning)
        ds = BlockDataset(url, shuffle=False, remote=RemoteConfig(timeout=5))
        assert len(list(ds)) == 60
        mine = [t for t in threads() if t not in before]
        assert len(mine) == 1 and mine[0].is_alive()  # kept for the next pass
        del ds
        gc.collect()
        mine[0].join(timeout=5)
        assert not mine[0].is_alive()
        gc.collect()
    assert not [w for w in seen if "unclosed" in str(w.message)]


def test_forked_workers_start_their_own_read_ahead_thread(big_url):
    from torch.utils.data import DataLoader

    url, local = big_url
    ds = BlockDataset(url, seed=2, remote=RemoteConfig(timeout=5))
    assert len(list(ds)) == 60  # the parent's thread runs (a forked worker has none of it)
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=60)  # a hung worker fails the test with a message
    assert sorted(s.key for s in dl) == sorted(s.key for s in iter_dataset(local))


def test_remote_runs_start_each_request_with_a_short_run(big_url, s3):
    import numpy as np

    from blocklm.pipeline.stream import FIRST_RUN_BYTES, REMOTE_RUN_BYTES, RunReader

    url, local = big_url
    s3_url = s3.upload(local, "blocklm-stream", "big")
    for src in (url, str(local), s3_url):
        remote = s3.config(timeout=5) if src == s3_url else RemoteConfig(timeout=5)
        ds = BlockDataset(src, shuffle=False, remote=remote)
        plan = ds.plan()
        shards, loc = plan.locate(np.arange(plan.size))
        reader = RunReader(ds.urls, ds.counts, ds.index_xxh3, opener=ds.opener,
                           limits=ds.limits, verify=True, stats=ds.stats)
        runs = list(reader.runs(shards, loc))
        reader.close()
        sizes = [end - start for _, _, _, start, end, _, _ in runs]
        firsts = [k for k, r in enumerate(runs)
                  if k == 0 or r[2] is not runs[k - 1][2] or r[3] >= runs[k - 1][6]]
        if src == url:  # each request's first run short, the others up to the remote run size
            assert len(firsts) == 2 and all(sizes[k] <= FIRST_RUN_BYTES for k in firsts)
            assert max(sizes) <= REMOTE_RUN_BYTES and max(sizes) > FIRST_RUN_BYTES
        else:  # a local shard is mapped, S3 reads each run alone: no short runs
            assert all(s > FIRST_RUN_BYTES for s in sizes[:-1])
