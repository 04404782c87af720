"""The bulk cut (pipeline/bulk.py) gives exactly the fast path's samples, refuses any chunk with a
difference (the fast path then reports it as before), and the loop that hands chunks out keeps
its counts (stats, the state's position) exact between any two samples."""

from __future__ import annotations

import mmap
import random
import shutil

import numpy as np
import pytest

from blocklm.formats import (
    ChecksumError,
    IndexMismatchError,
    Sample,
    ShardReader,
    ShardWriter,
    bytes_block,
    text_block,
)
from blocklm.formats.lazy import StoredBlock
from blocklm.formats.reader import BlockDecoder
from blocklm.pipeline import BlockDataset
from blocklm.pipeline.fastpath import CompiledShard, FastDecoder
from blocklm.pipeline.stream import STREAM_BYTES, RunReader

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """Single-block text samples, long ones stored as zstd, short ones raw, in shards of 100."""
    rng = random.Random(1)
    out = tmp_path_factory.mktemp("bulk") / "ds"
    with ShardWriter(out, max_samples=100) as w:
        for i in range(250):
            body = "to be or not " * rng.randrange(0, 60) + str(i)
            w.write(Sample(f"t{i:04d}", [text_block(body)]))
    return out


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    """Samples of one to three blocks (text and raw bytes)."""
    out = tmp_path_factory.mktemp("bulkm") / "ds"
    with ShardWriter(out, max_samples=60) as w:
        for i in range(130):
            blocks = [text_block(f"sample {i} " + "la " * (i % 40))]
            blocks += [bytes_block("raw", (k + 1,), bytes(range(k + 1))) for k in range(i % 3)]
            w.write(Sample(f"m{i:04d}", blocks))
    return out


def _decoder(tar: str) -> tuple[FastDecoder, ShardReader]:
    """The decoder of a compiled index's second pass (the first never cuts in bulk)."""
    r = ShardReader(tar)
    comp = CompiledShard(r.index.samples)
    assert FastDecoder(comp, BlockDecoder(tar)).bulk() is None
    return FastDecoder(comp, BlockDecoder(tar)), r


def test_the_bulk_form_is_compiled_on_a_shards_second_pass_only(texts):
    ds = BlockDataset(texts, shuffle=False)
    first = [s.key for s in ds]
    comps = [ds._indexes.get(u) for u in ds.urls]
    assert all(c is not None and c.bulk is None for c in comps)
    assert [s.key for s in ds] == first
    assert all(c.bulk is not None for c in comps)
    cold = BlockDataset(texts, shuffle=False, index_cache_entries=0)  # every pass a first one
    for _ in range(2):
        assert [s.key for s in cold] == first


@pytest.mark.parametrize("which", ["texts", "multi"])
def test_bulk_cut_equals_the_fast_path(which, request):
    folder = request.getfixturevalue(which)
    tar = str(folder / "shard-000000.tar")
    dec, r = _decoder(tar)
    bulk = dec.bulk()
    n = len(r)
    data = (folder / "shard-000000.tar").read_bytes()
    with open(tar, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    mv = memoryview(m)
    rng = random.Random(0)
    spans = [(0, n)] + [sorted(rng.sample(range(n + 1), 2)) for _ in range(20)]
    zstd_seen = False
    for l0, l1 in spans:
        if l1 == l0:
            continue
        # from the mapping (file offsets) and from a buffer holding just the run (offset base)
        base, end = dec.shard.offs[l0], dec.shard.ends[l1 - 1]
        run = data[base:end]
        for buf, view, b in ((m, mv, 0), (run, memoryview(run), base)):
            got = bulk.cut(l0, l1, buf, np.frombuffer(view, dtype=np.uint8), b)
            want = [dec.sample(i, buf, view, b) for i in range(l0, l1)]
            assert got == want == [r[i] for i in range(l0, l1)]
            assert [[type(x) for x in s.blocks] for s in got] == \
                [[type(x) for x in s.blocks] for s in want]
            zstd_seen |= any(type(x) is StoredBlock for s in got for x in s.blocks)
    assert zstd_seen or which == "multi"
    del mv
    m.close()


def _field(tar, i: int, what: str) -> tuple[int, str]:
    """(byte offset, key) of sample ``i``'s header name, payload name, size field or payload."""
    e = ShardReader(str(tar)).index.samples[i]
    at = {"header_name": e.offset + 3, "payload_name": e.blocks[0].offset - 512 + 2,
          "size_field": e.blocks[0].offset - 512 + 130, "payload": e.blocks[0].offset}[what]
    return at, e.key


@pytest.mark.parametrize("what,err", [("header_name", IndexMismatchError),
                                      ("payload_name", IndexMismatchError),
                                      ("size_field", IndexMismatchError),
                                      ("payload", ChecksumError)])
def test_a_chunk_with_any_difference_is_cut_again_one_by_one(texts, tmp_path, what, err):
    d = tmp_path / "ds"
    shutil.copytree(texts, d)
    tar = d / "shard-000001.tar"
    at, key = _field(tar, 30, what)
    data = bytearray(tar.read_bytes())
    data[at] ^= 0x01
    tar.write_bytes(bytes(data))
    dec, r = _decoder(str(tar))
    m = bytes(data)
    arr = np.frombuffer(m, dtype=np.uint8)
    assert dec.bulk().cut(20, 40, m, arr, 0) is None
    assert dec.bulk().cut(40, 60, m, arr, 0) is not None  # the others still go in bulk
    ds = BlockDataset(d, shuffle=False)
    for _ in range(2):  # cut sample by sample, then in bulk: the same error
        with pytest.raises(err) as e:
            list(ds)
        assert e.value.key == key and e.value.shard.endswith("shard-000001.tar")
    ds = BlockDataset(d, shuffle=False, on_error="skip")
    for k in (1, 2):
        got = [s.key for s in ds]
        assert key not in got and len(got) == 249 and ds.stats.skips == k


def test_runs_cover_the_plan_in_order_within_run_bytes(texts):
    ds = BlockDataset(texts, shuffle=False)
    rng = np.random.default_rng(0)
    for run_bytes in (1, 5000, 1 << 20):
        reader = RunReader(ds.urls, ds.counts, ds.index_xxh3, opener=ds.opener,
                           limits=ds.limits, verify=True, stats=ds.stats, run_bytes=run_bytes)
        plan = ds.plan()
        needed = np.sort(rng.choice(plan.size, size=180, replace=False))
        shards, local = plan.locate(needed)
        k, req, prev = 0, None, None
        for i, j, o, start, end, lo, until in reader.runs(shards, local):
            assert i == k and j > i
            k = j
            # one remote request per stretch of runs without a gap, up to a run's end
            assert until >= end and until in o.ends
            if prev is not None and prev[2] == until and prev[0] is o:
                assert start == prev[1]  # goes on from the previous run of the request
            else:
                req = start
            assert until - req <= STREAM_BYTES or until == end
            prev = (o, end, until)
            assert (shards[i:j] == shards[i]).all() and (local[i:j] == np.arange(lo, lo + j - i)).all()
            assert start == o.offs[lo] and end == o.ends[lo + j - i - 1]
            assert j - i == 1 or end - start <= run_bytes
            # maximal: the next planned sample is not the next one of the shard, or would not fit
            if j < len(shards) and shards[j] == shards[i] and local[j] == lo + j - i:
                assert o.ends[local[j]] - start > run_bytes
        assert k == len(shards)
        reader.close()


@pytest.mark.parametrize("transform", [None, lambda s: s.key])
def test_counts_are_exact_between_any_two_samples(texts, transform):
    ds = BlockDataset(texts, shuffle=False, transform=transform)
    it = iter(ds)
    for k in range(1, 131):  # across chunk (64) and shard (100) boundaries
        next(it)
        assert ds.stats.samples == k and ds.state_dict()["yielded"] == k
    state = ds.state_dict()
    rest = BlockDataset(texts, shuffle=False, transform=transform)
    rest.load_state_dict(state)
    keys = [s if transform else s.key for s in rest]
    assert keys == [f"t{i:04d}" for i in range(130, 250)]
    it.close()
    assert ds.stats.samples == 130


def test_two_interleaved_passes_count_each_sample_once(texts):
    ds = BlockDataset(texts, shuffle=False)
    a, b = iter(ds), iter(ds)
    for _ in range(70):
        next(a)
        next(b)
        next(b)
    assert ds.stats.samples == 210
    assert sum(1 for _ in a) == 180 and ds.stats.samples == 390
