"""Zero-copy local reads: large payloads are verified views of a mapped shard, kept alive by the
blocks that hold them, pickled as bytes, and equal to what the format's reader builds."""

from __future__ import annotations

import mmap
import pickle
import random
import shutil

import pytest
from torch.utils.data import DataLoader

from blocklm.formats import (
    ChecksumError,
    Sample,
    ShardWriter,
    bytes_block,
    iter_dataset,
    text_block,
)
from blocklm.formats.lazy import StoredBlock, ViewBlock
from blocklm.formats.reader import LocalSource
from blocklm.pipeline import BlockDataset
from blocklm.pipeline.fastpath import VIEW_MIN
from blocklm.pipeline.maps import MapCache


@pytest.fixture(scope="module")
def big_shards(tmp_path_factory):
    """Samples with a random (stored raw) payload above VIEW_MIN, a compressible text block
    above it (stored as zstd) and a small text block (copied)."""
    rng = random.Random(0)
    out = tmp_path_factory.mktemp("big") / "ds"
    with ShardWriter(out, max_samples=3) as w:
        for i in range(7):
            raw = rng.randbytes(VIEW_MIN + 1000 * i)
            w.write(Sample(f"b{i}", [bytes_block("raw", (len(raw),), raw),
                                     text_block("".join(rng.choices("abcdefgh ", k=4 * VIEW_MIN))),
                                     text_block(f"small {i}")]))
    return out


def _is_mapped_view(v: memoryview) -> bool:
    return isinstance(v, memoryview) and isinstance(v.obj, mmap.mmap)


def test_large_payloads_are_views_of_the_mapped_shard(big_shards):
    got = list(BlockDataset(big_shards, shuffle=False))
    for s in got:
        raw, text, small = s.blocks
        assert type(raw) is ViewBlock and _is_mapped_view(raw.view)
        assert type(text) is StoredBlock and _is_mapped_view(text._stored)
        assert type(small).__name__ == "Block" and isinstance(small.payload, bytes)
    assert got == list(iter_dataset(big_shards))  # same Samples as the format's reader
    raw = got[0].blocks[0]  # payload made bytes on use, the view let go
    assert isinstance(raw.payload, bytes) and raw.view.obj is raw.payload


def test_views_outlive_the_dataset_and_its_mappings(big_shards):
    want = [bytes(s.blocks[0].payload) for s in iter_dataset(big_shards)]
    ds = BlockDataset(big_shards, shuffle=False)
    views = [s.blocks[0].view for s in ds]
    ds._maps.clear()  # every source closed: the views keep their mappings alive
    del ds
    assert [bytes(v) for v in views] == want


def test_blocks_with_views_pickle_as_bytes(big_shards):
    got = list(BlockDataset(big_shards, shuffle=False))
    back = pickle.loads(pickle.dumps(got))
    assert isinstance(back[0].blocks[1]._stored, bytes)  # still compressed, now as bytes
    assert isinstance(back[0].blocks[0].payload, bytes)
    assert back == got
    # and through a DataLoader worker process, which pickles every sample
    ds = BlockDataset(big_shards, shuffle=False)
    assert list(DataLoader(ds, batch_size=None, num_workers=1)) == got


def test_corrupt_mapped_payload_is_caught_naming_shard_and_key(big_shards, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(big_shards, copy)
    sample = next(iter(BlockDataset(copy, shuffle=False)))
    shard = copy / "shard-000000.tar"
    data = bytearray(shard.read_bytes())
    i = data.index(bytes(sample.blocks[0].view[:64]))
    data[i + 5000] ^= 0xFF  # inside b0's raw payload
    del sample
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumError) as e:
        list(BlockDataset(copy, shuffle=False))
    assert e.value.shard.endswith("shard-000000.tar") and e.value.key == "b0"


def test_local_source_view_is_bounds_checked(big_shards):
    from blocklm.formats import TruncatedShardError

    src = LocalSource(big_shards / "shard-000000.tar")
    n = src.size()
    assert bytes(src.view(0, 100)) == src.read(0, 100)
    with pytest.raises(TruncatedShardError):
        src.view(n - 10, 11)
    with pytest.raises(TruncatedShardError):
        src.view(-1, 5)
    v = src.view(0, 512)
    src.close()
    assert bytes(v) == src.read(0, 512)  # still mapped while the view lives


def test_mapped_shards_are_reused_across_epochs_and_bounded(big_shards, tmp_path):
    ds = BlockDataset(big_shards, seed=0)
    list(ds)
    urls = list(ds._maps._items)
    first = [ds._maps.get(u) for u in urls]
    ds.set_epoch(1)
    list(ds)
    assert len(urls) == 3 and [ds._maps.get(u) for u in urls] == first  # mapped once
    small = BlockDataset(big_shards, seed=0, map_cache_bytes=0)
    assert sorted(s.key for s in small) == sorted(s.key for s in ds) and not small._maps._items

    urls.sort()
    sizes = [LocalSource(u).size() for u in urls]
    cache = MapCache(max_bytes=sizes[1] + sizes[2], max_files=8)
    srcs = [LocalSource(u) for u in urls]
    for u, s in zip(urls, srcs):
        s.mapped()
        assert cache.put(u, s)
    assert urls[0] not in cache and urls[1] in cache and urls[2] in cache  # LRU dropped
    assert srcs[0]._map is None  # and closed
    cache = MapCache(max_bytes=1 << 30, max_files=1)
    cache.put(urls[0], LocalSource(urls[0]))
    cache.put(urls[1], LocalSource(urls[1]))
    assert list(cache._items) == [urls[1]]


def test_a_source_that_overrides_read_is_read_not_mapped(big_shards):
    # a LocalSource subclass that filters or counts its reads (fault injection, accounting) must
    # still see every byte the loader takes: it is never bypassed through a mapping
    class Counting(LocalSource):
        calls = 0

        def read(self, offset: int, length: int) -> bytes:
            Counting.calls += self.name.endswith(".tar")  # not the manifest or an index
            return super().read(offset, length)

    got = list(BlockDataset(big_shards, shuffle=False, opener=lambda u: Counting(u)))
    assert Counting.calls >= 3  # one run per shard at least
    assert all(type(s.blocks[0]).__name__ == "Block" for s in got)  # copied, not views
    assert got == list(iter_dataset(big_shards))

    reads = []

    def patched(url: str) -> LocalSource:  # read() replaced on the instance, as tests do
        src = LocalSource(url)
        orig = src.read
        src.read = lambda offset, length: reads.append(url) or orig(offset, length)
        return src

    assert list(BlockDataset(big_shards, shuffle=False, opener=patched)) == got
    assert sum(u.endswith(".tar") for u in reads) >= 3


def test_pages_are_populated_once_per_mapping(big_shards):
    src = LocalSource(big_shards / "shard-000000.tar")
    src.populate(0, 10)  # not mapped yet: nothing to do
    m, _ = src.mapped()
    n = len(m)
    assert not any(src._populated)
    src.populate(100, 200)
    assert src._populated[0] == 1
    src.populate(0, n)
    assert all(src._populated) and len(src._populated) == (n + (1 << 20) - 1) >> 20
    src.close()
