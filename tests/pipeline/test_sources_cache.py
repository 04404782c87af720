"""The local cache of remote shards: LRU eviction under a byte cap, never a half-written file."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from blocklm.formats import LocalSource
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener, ShardCache


class Remote(LocalSource):
    """A local file posing as a remote one, counting reads."""

    reads = 0

    def read(self, offset, length):
        Remote.reads += 1
        return super().read(offset, length)


def files(tmp_path, n, size):
    out = []
    for i in range(n):
        p = tmp_path / f"f{i}.tar"
        p.write_bytes(bytes([i]) * size)
        out.append(p)
    return out


def test_lru_eviction_under_the_cap(tmp_path):
    f = files(tmp_path, 4, 1000)
    cache = ShardCache(tmp_path / "cache", max_bytes=2500)
    for p in f[:2]:
        assert cache.open(f"http://x/{p.name}", Remote(p)).read(0, 1000) == p.read_bytes()
    past = time.time() - 100
    os.utime(cache.path_for("http://x/f1.tar"), (past, past))  # f1 is now the oldest use
    cache.open("http://x/f0.tar", Remote(f[0]))  # a hit refreshes f0
    assert cache.hits == 1 and cache.misses == 2
    cache.open("http://x/f2.tar", Remote(f[2]))  # 3000 bytes > cap: evict the LRU, f1
    names = sorted(p.name.split("-", 1)[1] for _, _, p in cache.entries())
    assert names == ["f0.tar", "f2.tar"] and cache.evictions == 1
    assert cache.total_bytes() <= 2500


def test_a_half_written_file_is_never_served(tmp_path):
    (f,) = files(tmp_path, 1, 5000)
    cache = ShardCache(tmp_path / "cache", max_bytes=10_000)
    final = cache.path_for("http://x/f0.tar")
    final.parent.mkdir(parents=True)
    partial = final.with_name("." + final.name + ".123-abcd.part")
    partial.write_bytes(b"\0" * 100)  # a download that died half-way
    src = cache.open("http://x/f0.tar", Remote(f))
    assert src.read(0, 5000) == f.read_bytes() and cache.misses == 1


def test_failed_download_leaves_nothing_behind(tmp_path):
    (f,) = files(tmp_path, 1, 5000)

    class Failing(Remote):
        def read(self, offset, length):
            raise OSError("connection reset")

    cache = ShardCache(tmp_path / "cache", max_bytes=10_000)
    with pytest.raises(OSError):
        cache.open("http://x/f0.tar", Failing(f))
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_file_larger_than_the_cache_is_read_remotely(tmp_path):
    (f,) = files(tmp_path, 1, 5000)
    cache = ShardCache(tmp_path / "cache", max_bytes=1000)
    remote = Remote(f)
    assert cache.open("http://x/f0.tar", remote) is remote


def test_an_evicted_file_stays_readable_by_its_open_source(tmp_path):
    f = files(tmp_path, 2, 1000)
    cache = ShardCache(tmp_path / "cache", max_bytes=1500)
    src = cache.open("http://x/f0.tar", Remote(f[0]))
    cache.open("http://x/f1.tar", Remote(f[1]))  # evicts f0
    assert cache.evictions == 1
    assert src.read(0, 1000) == f[0].read_bytes()


def test_dataset_over_http_with_cache(nginx, small_shards, small_keys, tmp_path):
    shutil.copytree(small_shards, nginx.root / "cached")
    remote = RemoteConfig(timeout=5, cache_dir=str(tmp_path / "cache"), cache_bytes=50 << 20)
    opener = RemoteOpener(remote)
    ds = BlockDataset(f"{nginx.url}/cached", seed=1, opener=opener)
    first = [s.key for s in ds]
    assert sorted(first) == sorted(small_keys)
    misses = opener._cache.misses
    ds.set_epoch(1)
    assert sorted(s.key for s in ds) == sorted(small_keys)
    assert opener._cache.misses == misses and opener._cache.hits > 0
