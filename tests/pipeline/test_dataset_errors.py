"""on_error: corrupt samples and unreadable shards raise typed errors naming shard and key, or are
skipped and counted with their reasons. Nothing is skipped silently."""

from __future__ import annotations

import shutil

import pytest

from blocklm.formats import ChecksumError, FormatError, ShardReader, TruncatedShardError
from blocklm.pipeline import BlockDataset

pytestmark = pytest.mark.filterwarnings("ignore:.set_vital. is deprecated")


@pytest.fixture
def copy(small_shards, tmp_path):
    d = tmp_path / "ds"
    shutil.copytree(small_shards, d)
    return d


def flip_payload_byte(folder, shard: str, i: int) -> str:
    """Corrupt one payload byte of sample ``i`` of ``shard``; returns its key."""
    tar = folder / shard
    e = ShardReader(str(tar)).index.samples[i]
    data = bytearray(tar.read_bytes())
    data[e.blocks[0].offset] ^= 0xFF
    tar.write_bytes(bytes(data))
    return e.key


def test_corrupt_sample_raises_naming_shard_and_key(copy):
    key = flip_payload_byte(copy, "shard-000001.tar", 3)
    with pytest.raises(ChecksumError) as e:
        list(BlockDataset(copy, shuffle=False))
    assert e.value.key == key and e.value.shard.endswith("shard-000001.tar")
    assert key in str(e.value) and "shard-000001.tar" in str(e.value)


def test_corrupt_sample_is_skipped_and_counted(copy, small_keys):
    key = flip_payload_byte(copy, "shard-000001.tar", 3)
    ds = BlockDataset(copy, seed=2, on_error="skip")
    got = [s.key for s in ds]
    assert sorted(got) == sorted(k for k in small_keys if k != key)
    assert ds.stats.skips == 1 and ds.stats.skip_reasons == {"ChecksumError": 1}
    assert ds.stats.skipped[0]["key"] == key
    assert ds.stats.samples == len(small_keys) - 1


def test_missing_shard_raises_or_skips_all_its_samples(copy, small_keys):
    n = len(ShardReader(str(copy / "shard-000002.tar")))
    (copy / "shard-000002.tar").unlink()
    with pytest.raises(FormatError) as e:
        list(BlockDataset(copy, shuffle=False))
    assert e.value.shard.endswith("shard-000002.tar") and e.value.key is not None
    ds = BlockDataset(copy, shuffle=False, on_error="skip")
    got = [s.key for s in ds]
    assert len(got) == len(small_keys) - n
    assert ds.stats.skips == n and sum(ds.stats.skip_reasons.values()) == n
    assert all(s["shard"].endswith("shard-000002.tar") for s in ds.stats.skipped)


def test_truncated_shard(copy, small_keys):
    tar = copy / "shard-000003.tar"
    tar.write_bytes(tar.read_bytes()[:20_000])
    with pytest.raises(TruncatedShardError):
        list(BlockDataset(copy, shuffle=False))
    ds = BlockDataset(copy, shuffle=False, on_error="skip")
    got = [s.key for s in ds]
    assert ds.stats.skips == len(small_keys) - len(got) > 0
    assert set(ds.stats.skip_reasons) == {"TruncatedShardError"}


def test_corrupt_index_is_caught_by_the_manifest_checksum(copy, small_keys):
    idx = copy / "shard-000004.index.json"
    idx.write_bytes(idx.read_bytes().replace(b'"offset":', b'"offset": ', 1))
    with pytest.raises(ChecksumError) as e:
        list(BlockDataset(copy, shuffle=False))
    assert "shard-000004" in str(e.value)
    ds = BlockDataset(copy, shuffle=False, on_error="skip")
    got = [s.key for s in ds]
    assert ds.stats.skips == len(small_keys) - len(got) > 0


def test_unreadable_shard_without_manifest_is_counted_at_planning(copy, small_keys):
    (copy / "shard-000005.tar").unlink()
    (copy / "shard-000005.index.json").unlink()
    tars = sorted(str(p) for p in copy.glob("*.tar")) + [str(copy / "shard-000005.tar")]
    with pytest.raises(FormatError):
        BlockDataset(tars)
    ds = BlockDataset(tars, on_error="skip")
    assert ds.stats.skips == 1 and ds.stats.skipped[0]["shard"].endswith("shard-000005.tar")
    assert len(list(ds)) == len(small_keys) - 45


def test_skips_in_workers_are_reported_through_the_loader_state(copy, small_keys):
    StatefulDataLoader = pytest.importorskip("torchdata.stateful_dataloader").StatefulDataLoader

    key = flip_payload_byte(copy, "shard-000002.tar", 5)
    dl = StatefulDataLoader(BlockDataset(copy, on_error="skip"), batch_size=None, num_workers=2,
                            multiprocessing_context="fork")
    got = [s.key for s in dl]
    assert sorted(got) == sorted(k for k in small_keys if k != key)
    stats = BlockDataset.stats_of(dl.state_dict())
    assert stats.samples == len(small_keys) - 1 and stats.skips == 1
    assert stats.skipped[0]["key"] == key


def test_error_type_survives_a_worker_process(copy):
    # What a DataLoader worker does with an exception (a real worker would also cost the 5 s
    # PyTorch waits when it shuts down a loader whose worker raised).
    import sys

    from torch._utils import ExceptionWrapper

    flip_payload_byte(copy, "shard-000000.tar", 0)
    try:
        list(BlockDataset(copy, shuffle=False))
    except ChecksumError:
        wrapped = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 0")
    with pytest.raises(ChecksumError) as e:
        wrapped.reraise()
    assert "s00000" in str(e.value) and "shard-000000.tar" in str(e.value)


def test_on_error_must_be_known(small_shards):
    with pytest.raises(ValueError):
        BlockDataset(small_shards, on_error="ignore")
