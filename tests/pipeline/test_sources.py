"""Remote sources: nginx over HTTP and moto over S3 read the same samples as the local disk, with
range requests (one per run of samples); faults (cut, stall, error) are retried and every sample is
delivered exactly once; reads time out instead of hanging."""

from __future__ import annotations

import re
import shutil
import time

import pytest

from blocklm.formats import iter_dataset
from blocklm.pipeline import (
    BlockDataset,
    HTTPSource,
    NotFoundError,
    RemoteConfig,
    RemoteOpener,
    RetryPolicy,
    SourceError,
)

FAST_RETRY = RetryPolicy(retries=4, backoff=0.01, max_backoff=0.05, deadline=20)
WORKER_TIMEOUT_S = 60  # DataLoader(timeout=): a worker that hangs fails its test with a message


@pytest.fixture(scope="session")
def http_url(nginx, small_shards) -> str:
    shutil.copytree(small_shards, nginx.root / "small")
    return f"{nginx.url}/small"


@pytest.fixture(scope="session")
def s3_url(s3, small_shards) -> str:
    return s3.upload(small_shards, "blocklm-test", "small")


class CountingOpener(RemoteOpener):
    """Records every ``read(offset, length)`` made through the sources it opens."""

    def __init__(self, config=None):
        super().__init__(config)
        self.reads: list[tuple[str, int, int]] = []

    def __call__(self, url):
        src = super().__call__(url)
        orig = src.read

        def read(offset, length):
            self.reads.append((url, offset, length))
            return orig(offset, length)

        src.read = read
        return src


def test_http_reads_the_same_samples_with_one_request_per_run(http_url, small_shards,
                                                              small_keys):
    opener = CountingOpener(RemoteConfig(timeout=5))
    got = list(BlockDataset(http_url, shuffle=False, opener=opener))
    assert got == list(iter_dataset(small_shards))
    shard_reads = [r for r in opener.reads if r[0].endswith(".tar")]
    assert len(shard_reads) == len(list(small_shards.glob("*.tar")))  # each shard < one run
    n = len(list(small_shards.glob("*.tar"))) - 1
    pattern = f"{http_url}/shard-{{000000..{n:06d}}}.tar"
    assert [s.key for s in BlockDataset(pattern, seed=3)] == \
        [s.key for s in BlockDataset(small_shards, seed=3)]


def test_s3_reads_the_same_samples(s3, s3_url, small_shards):
    ds = BlockDataset(s3_url, seed=2, remote=s3.config(timeout=5))
    assert list(ds) == list(BlockDataset(small_shards, seed=2))
    assert ds.stats.retries == 0


def test_any_fsspec_url(small_shards, small_keys):
    url = "memory://blocklm-test/small"
    import fsspec

    fs = fsspec.filesystem("memory")
    for p in small_shards.iterdir():
        fs.pipe(f"{url}/{p.name}", p.read_bytes())
    assert [s.key for s in BlockDataset(url, shuffle=False)] == small_keys


@pytest.mark.parametrize("kind", ["cut", "stall", "error"])
def test_http_faults_are_retried_and_every_sample_arrives_once(nginx, http_url, small_keys,
                                                               fault_proxy, kind):
    proxy = fault_proxy(nginx.port)
    url = http_url.replace(nginx.url, proxy.url)
    remote = RemoteConfig(timeout=1.0, retry=FAST_RETRY)  # margin for a loaded machine
    # a fault goes to the next new connection, and two threads open them in an order that
    # depends on timing (indexes in the calling thread, ~70 KB in all; shards in the read-ahead
    # thread): the cut points add up to less than either thread's bytes, so that every fault
    # fires whichever connection it lands on
    for after in (30_000, 9_000, 5_000, 1_000):
        proxy.add(kind, after=after, seconds=3.0, status=503)
    ds = BlockDataset(url, seed=4, remote=remote)
    got = [s.key for s in ds]
    assert sorted(got) == sorted(small_keys)
    assert proxy.faults_done == 4
    assert ds.stats.retries >= 4 and ds.stats.skips == 0


def test_http_read_resumes_at_the_byte_where_it_stopped(nginx, http_url, small_shards,
                                                        fault_proxy):
    proxy = fault_proxy(nginx.port)
    name = "shard-000001.tar"
    data = (small_shards / name).read_bytes()
    proxy.add("cut", after=20_000)
    opener = RemoteOpener(RemoteConfig(timeout=2, retry=FAST_RETRY))
    src = opener(f"{proxy.url}/small/{name}")
    assert src.read(1000, len(data) - 1000) == data[1000:]
    ranges = [m.group(1) for r in proxy.requests
              if (m := re.search(rb"Range: bytes=(\d+)-", r))]
    assert ranges[0] == b"1000"
    resumed = int(ranges[1])
    assert 1000 < resumed < 20_000 + 1000  # after the bytes received, before the cut's end
    assert src.retries == 1


@pytest.mark.parametrize("kind", ["cut", "error"])
def test_s3_faults_are_retried(s3, s3_url, small_keys, fault_proxy, kind):
    proxy = fault_proxy(s3.port)
    proxy.add(kind, after=200, status=503, times=3)  # moto closes connections after each answer
    ds = BlockDataset(s3_url, seed=1, remote=s3.config(endpoint=proxy.url, timeout=2,
                                                        retry=FAST_RETRY))
    assert sorted(s.key for s in ds) == sorted(small_keys)
    # s3fs absorbs some failures itself (e.g. a failed HEAD falls back to a listing)
    assert proxy.faults_done == 3 and ds.stats.retries >= 1


def test_s3_in_dataloader_workers(s3, s3_url, small_keys):
    from torch.utils.data import DataLoader

    ds = BlockDataset(s3_url, seed=1, remote=s3.config(timeout=5))  # s3fs used before the fork
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=WORKER_TIMEOUT_S)  # a hung worker fails the test, not the suite
    assert sorted(s.key for s in dl) == sorted(small_keys)


def test_forked_workers_leave_the_parents_s3_clients_alone(s3, s3_url, small_keys, monkeypatch):
    """A worker neither closes the parent's live s3fs client nor one left as garbage (a cycle the
    parent has not collected yet): in the worker that client's event loop has no thread (closing
    it waited out a timeout, then unregistered the parent's sockets from their shared epoll)."""
    import gc
    import os
    import weakref

    import s3fs
    from torch.utils.data import DataLoader, IterableDataset

    closed = []  # the pid of every s3fs close_session call, in the process that makes it
    close = s3fs.S3FileSystem.close_session

    def record(loop, client):
        closed.append(os.getpid())
        return close(loop, client)

    monkeypatch.setattr(s3fs.S3FileSystem, "close_session", staticmethod(record))
    ds = BlockDataset(s3_url, seed=1, remote=s3.config(timeout=5))
    parents = weakref.ref(ds.opener._clients["s3"])

    class Probe(IterableDataset):
        def __iter__(self):
            yield from (s.key for s in ds)  # the worker makes its own client
            gc.collect()
            yield {"closed": sum(pid == os.getpid() for pid in closed),
                   "alive": parents() is not None}

    dl = DataLoader(Probe(), batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=WORKER_TIMEOUT_S)
    gc.disable()  # the garbage below must still be there at the fork
    try:
        garbage = [BlockDataset(s3_url, seed=1, remote=s3.config(timeout=5))]
        garbage.append(garbage)  # a cycle: only the garbage collector frees it
        del garbage
        it = iter(dl)  # forks the workers
    finally:
        gc.enable()
    got = list(it)
    assert sorted(g for g in got if isinstance(g, str)) == sorted(small_keys)
    # one report per worker: nothing of the parent's closed there, its live client kept alive
    assert [g for g in got if isinstance(g, dict)] == [{"closed": 0, "alive": True}] * 2


def test_a_worker_forked_while_fsspecs_loop_lock_is_held_does_not_hang(s3, s3_url, small_keys):
    """fsspec's after-fork reset leaves its loop-creation lock as it was at the fork: a worker
    forked while another thread held it (starting fsspec's IO loop) waited on it forever."""
    import fsspec.asyn
    from torch.utils.data import DataLoader

    ds = BlockDataset(s3_url, seed=1, remote=s3.config(timeout=5))
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=WORKER_TIMEOUT_S)
    with fsspec.asyn.get_lock():  # as if another thread were in fsspec.asyn.get_loop()
        it = iter(dl)  # forks the workers
    assert sorted(s.key for s in it) == sorted(small_keys)


def test_a_stalled_server_times_out_instead_of_hanging(nginx, http_url, fault_proxy):
    proxy = fault_proxy(nginx.port)
    proxy.add("stall", after=100, seconds=20, times=3)
    remote = RemoteConfig(timeout=0.3, retry=RetryPolicy(retries=2, backoff=0.01))
    t = time.monotonic()
    src = RemoteOpener(remote)(f"{proxy.url}/small/shard-000000.tar")
    assert isinstance(src, HTTPSource)
    with pytest.raises(SourceError) as e:
        src.read(0, 100_000)
    assert time.monotonic() - t < 5
    assert "shard-000000.tar" in str(e.value)


def test_missing_remote_data_is_not_retried(http_url):
    t = time.monotonic()
    with pytest.raises(NotFoundError):
        BlockDataset(http_url + "-missing", remote=RemoteConfig(timeout=2))
    assert time.monotonic() - t < 2


def test_http_in_dataloader_workers(http_url, small_keys):
    from torch.utils.data import DataLoader

    ds = BlockDataset(http_url, seed=6, remote=RemoteConfig(timeout=5))
    dl = DataLoader(ds, batch_size=None, num_workers=2, multiprocessing_context="fork",
                    timeout=WORKER_TIMEOUT_S)
    assert sorted(s.key for s in dl) == sorted(small_keys)


def test_an_encoded_http_body_is_refused_not_taken_for_the_bytes(tmp_path):
    # the body is read without urllib3's decoding layer, so a server that compresses despite
    # "Accept-Encoding: identity" must be caught by its header, not hand out compressed bytes
    import http.server
    import threading

    class Gzipping(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's naming
            body = b"\x1f\x8b" + bytes(30)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes 0-{len(body) - 1}/{len(body)}")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Gzipping)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        src = RemoteOpener(RemoteConfig(timeout=5, retry=FAST_RETRY))(
            f"http://127.0.0.1:{server.server_port}/shard-000000.tar")
        with pytest.raises(SourceError, match="Content-Encoding 'gzip'") as e:
            src.read(0, 32)
        assert e.value.shard.endswith("shard-000000.tar")
    finally:
        server.shutdown()
        server.server_close()
