"""Requests sent ahead (HTTPSource.request_ahead, Connections.ahead): the next stretch's request
goes out while the current stretch is still received, and after a pass the first request of the
pass expected next; the read that makes the same request takes the answer, any other drops it;
faults on the connection that carried it are retried like any other; passes of any epoch, order
or resumed state read exactly what a local read does."""

from __future__ import annotations

import random
import re
import shutil

import pytest

from blocklm.formats import Sample, ShardWriter, bytes_block, iter_dataset
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener, RetryPolicy

FAST_RETRY = RetryPolicy(retries=4, backoff=0.01, max_backoff=0.05, deadline=20)


def _ranges(proxy, name: str) -> list[tuple[int, int]]:
    """The ranges asked for ``name`` through ``proxy``, in order."""
    out = []
    for r in proxy.requests:
        if name.encode() in r and (m := re.search(rb"Range: bytes=(\d+)-(\d+)", r)):
            out.append((int(m.group(1)), int(m.group(2))))
    return out


@pytest.fixture(scope="module")
def served(nginx, tmp_path_factory):
    """90 samples of 30 KB random payloads in shards of 30 (~0.9 MB: several runs each),
    served by nginx: (URL, local folder, shard names)."""
    src = tmp_path_factory.mktemp("ahead") / "ds"
    with ShardWriter(src, max_samples=30) as w:
        for i in range(90):
            data = random.Random(i).randbytes(30_000)
            w.write(Sample(f"a{i:03d}", [bytes_block("raw", (30_000,), data)]))
    shutil.copytree(src, nginx.root / "ahead")
    return f"{nginx.url}/ahead", src, sorted(p.name for p in src.glob("*.tar"))


def _sources(proxy, served, timeout=5.0, retry=None):
    url, local, names = served
    opener = RemoteOpener(RemoteConfig(timeout=timeout, **({"retry": retry} if retry else {})))
    srcs = [opener(f"{proxy.url}/ahead/{n}") for n in names]
    return srcs, [(local / n).read_bytes() for n in names]


def test_the_same_read_takes_the_request_sent_ahead(nginx, served, fault_proxy):
    proxy = fault_proxy(nginx.port)
    (src, _, _), (data, _, _) = _sources(proxy, served)
    src.request_ahead(1000, len(data))
    buf = bytearray(len(data))
    src.readinto(1000, memoryview(buf)[1000:5000], until=len(data))  # the request sent ahead
    src.readinto(5000, memoryview(buf)[5000:], until=len(data))  # the rest of its answer
    assert bytes(buf[1000:]) == data[1000:]
    assert _ranges(proxy, served[2][0]) == [(1000, len(data) - 1)]  # asked once
    assert proxy.connections == 1  # sent on the idle connection of the thread


def test_another_read_drops_the_request_sent_ahead(nginx, served, fault_proxy):
    proxy = fault_proxy(nginx.port)
    (src, other, _), (data, data2, _) = _sources(proxy, served)
    src.request_ahead(0, len(data))
    buf = bytearray(len(data2))
    other.readinto(100, memoryview(buf)[100:], until=len(data2))  # not the one sent ahead
    assert bytes(buf[100:]) == data2[100:]
    buf = bytearray(len(data))
    src.readinto(0, memoryview(buf), until=len(data))  # asked again: the first answer is gone
    assert bytes(buf) == data
    assert _ranges(proxy, served[2][0]) == [(0, len(data) - 1)] * 2


def test_a_request_ahead_while_a_body_is_parked_goes_on_a_second_connection(
        nginx, served, fault_proxy):
    proxy = fault_proxy(nginx.port)
    (a, b, c), (da, db, dc) = _sources(proxy, served)
    ba, bb, bc = bytearray(len(da)), bytearray(len(db)), bytearray(len(dc))
    a.readinto(0, memoryview(ba)[:70_000], until=len(da))  # the rest of the answer is parked
    b.request_ahead(0, len(db))
    a.readinto(70_000, memoryview(ba)[70_000:], until=len(da))  # from the parked answer
    b.readinto(0, memoryview(bb), until=len(db))  # from the answer sent ahead
    c.request_ahead(0, len(dc))  # the spare connection (the first one) carries it
    c.readinto(0, memoryview(bc), until=len(dc))
    assert (bytes(ba), bytes(bb), bytes(bc)) == (da, db, dc)
    assert [len(_ranges(proxy, n)) for n in served[2]] == [1, 1, 1]
    assert proxy.connections == 2


@pytest.mark.parametrize("kind", ["cut", "stall", "error"])
def test_a_fault_on_the_answer_sent_ahead_is_retried(nginx, served, fault_proxy, kind):
    proxy = fault_proxy(nginx.port)
    (a, b, _), (da, db, _) = _sources(proxy, served, timeout=0.5, retry=FAST_RETRY)
    proxy.add("cut", after=10**9)  # the first connection: no fault
    proxy.add(kind, after=50_000, seconds=3.0, status=503)  # the second: the request ahead
    ba, bb = bytearray(len(da)), bytearray(len(db))
    a.readinto(0, memoryview(ba)[:70_000], until=len(da))
    b.request_ahead(0, len(db))
    a.readinto(70_000, memoryview(ba)[70_000:], until=len(da))
    b.readinto(0, memoryview(bb)[:300_000], until=len(db))
    b.readinto(300_000, memoryview(bb)[300_000:], until=len(db))
    assert (bytes(ba), bytes(bb)) == (da, db)
    assert proxy.faults_done == 1 and b.retries == 1 and a.retries == 0  # (the first: none)
    starts = [s for s, _ in _ranges(proxy, served[2][1])]
    # a cut or stalled answer resumes where it stopped; an error answer (the proxy's own, the
    # request not passed on) is asked again from the start
    assert starts == ([0] if kind == "error" else [0, starts[1]]) and starts[-1] < 300_000
    assert kind == "error" or starts[1] > 0


def _keys(ds) -> list[str]:
    return [s.key for s in ds]


def test_passes_read_what_a_local_read_does_whatever_comes_next(nginx, served, fault_proxy):
    """The request sent ahead after each pass guesses the next pass (the same epoch after a
    repeated one, else the next epoch): right or wrong, each pass reads exactly its samples."""
    proxy = fault_proxy(nginx.port)
    url, local, _ = served
    remote = BlockDataset(url.replace(nginx.url, proxy.url), seed=3, shuffle_buffer=20,
                          remote=RemoteConfig(timeout=5))
    here = BlockDataset(local, seed=3, shuffle_buffer=20)
    for epoch in (0, 1, 2, 2, 2, 7, 3):  # guessed right, then wrong, then right, ...
        remote.set_epoch(epoch)
        here.set_epoch(epoch)
        assert remote.epoch == epoch and list(remote) == list(here)
    # a resumed pass (state taken mid-pass) is not the pass guessed: the guess is dropped
    remote.set_epoch(4)
    here.set_epoch(4)
    it = iter(remote)
    first = [next(it).key for _ in range(37)]
    state = remote.state_dict()
    it.close()
    remote.load_state_dict(state)
    rest = _keys(remote)
    assert first + rest == _keys(here)


def test_a_data_loader_worker_sends_nothing_ahead(nginx, served, fault_proxy):
    """A worker process ends with its epoch: it guesses no next pass."""
    from torch.utils.data import DataLoader

    proxy = fault_proxy(nginx.port)
    url, local, names = served
    ds = BlockDataset(url.replace(nginx.url, proxy.url), shuffle=False,
                      remote=RemoteConfig(timeout=5))
    got = [s.key for s in DataLoader(ds, batch_size=None, num_workers=1, timeout=60)]
    assert got == [s.key for s in iter_dataset(local)]
    assert [len(_ranges(proxy, n)) for n in names] == [1, 1, 1]
