"""``BlockDataset.load_indexes`` loads the local shards' indexes ahead, into the cache the passes
read them from (the trainer does it before it freezes the objects alive at its start): the
passes then use those very indexes and hand out exactly what they did without it, bad indexes
included; nothing is loaded when the cache could not hold them all."""

from __future__ import annotations

import pytest

from blocklm.formats import Sample, ShardWriter, text_block
from blocklm.pipeline import BlockDataset

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


def _shards(folder) -> str:
    with ShardWriter(folder, max_samples=40) as w:
        for i in range(130):
            w.write(Sample(f"t{i:04d}", [text_block("to be " * (i % 30) + str(i))]))
    return str(folder)


def _outcome(ds: BlockDataset) -> list:
    out: list = []
    for _ in range(2):
        try:
            out.append([s.key for s in ds])
        except Exception as e:  # noqa: BLE001 - what a pass raises is part of its outcome
            out.append((type(e).__name__, str(e)))
    return out


def test_the_passes_read_the_indexes_loaded_ahead_and_hand_out_the_same(tmp_path):
    folder = _shards(tmp_path / "ds")
    ds = BlockDataset(folder, shuffle=True, seed=3)
    assert all(ds._indexes.get(u) is None for u in ds.urls)
    assert ds.load_indexes() == len(ds.urls) == 4
    comps = [ds._indexes.get(u) for u in ds.urls]
    assert all(c is not None and not c.opened for c in comps)
    assert _outcome(ds) == _outcome(BlockDataset(folder, shuffle=True, seed=3))
    assert all(ds._indexes.get(u) is c and c.opened for u, c in zip(ds.urls, comps))
    small = BlockDataset(folder, shuffle=True, seed=3, index_cache_entries=129)
    assert small.load_indexes() == 0 and all(small._indexes.get(u) is None for u in small.urls)


def test_a_bad_index_is_left_to_its_pass(tmp_path):
    folder = _shards(tmp_path / "ds")
    bad = tmp_path / "ds" / "shard-000001.index.json"
    bad.write_bytes(bad.read_bytes().replace(b'"t0041"', b'"t0xyz"'))
    ds = BlockDataset(folder, shuffle=True, seed=3)
    assert ds.load_indexes() == 3
    assert ds._indexes.get(ds.urls[1]) is None
    got = _outcome(ds)
    assert got == _outcome(BlockDataset(folder, shuffle=True, seed=3))
    assert got[0][0] == "ChecksumError" and "shard-000001.index.json" in got[0][1]
