"""Corrupt, hostile and inconsistent shards give clear typed errors: never a crash, hang or
huge allocation."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import zstandard

from blocklm.formats import (
    ChecksumError,
    FormatError,
    IndexMismatchError,
    LimitError,
    Sample,
    ShardIndex,
    ShardReader,
    ShardWriter,
    TruncatedShardError,
    UnsafeMemberError,
    build_index,
    bytes_block,
    iter_dataset,
    iter_index,
    load_index,
    scan_shard,
    text_block,
)


@pytest.fixture
def shard(tmp_path):
    with ShardWriter(tmp_path) as w:
        for i in range(4):
            w.write(Sample(f"k{i}", [text_block(f"sample {i} " * 50), bytes_block("x", (3,), b"abc")]))
    return tmp_path / "shard-000000.tar"


def test_flipped_payload_byte_is_a_checksum_error(shard):
    idx = load_index(str(shard))
    target = idx.samples[2].blocks[0]
    data = bytearray(shard.read_bytes())
    data[target.offset + 5] ^= 0x01
    shard.write_bytes(bytes(data))
    r = ShardReader(str(shard))
    assert r[1].key == "k1"
    with pytest.raises(ChecksumError) as e:
        r[2]
    assert (e.value.shard, e.value.key, e.value.block) == (str(shard), "k2", 0)
    assert "checksum" in str(e.value) and "k2" in str(e.value)
    with pytest.raises(ChecksumError):
        list(r)
    # verification can be turned off: the zstd frame then fails, still a clear error
    with pytest.raises(FormatError):
        ShardReader(str(shard), verify=False)[2]


def test_truncated_shard(shard):
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(TruncatedShardError, match="wanted"):
        list(ShardReader(str(shard)))
    with open(shard, "rb") as f, pytest.raises(TruncatedShardError):
        list(scan_shard(f, shard=str(shard)))


def test_garbage_index(shard):
    ipath = shard.with_name("shard-000000.index.json")
    ipath.write_bytes(b"\x00\xffnot json at all")
    with pytest.raises(FormatError, match="not valid JSON"):
        ShardReader(str(shard))
    ipath.write_text(json.dumps({"blocklm_index": 1, "shard": "shard-000000.tar",
                                 "shard_bytes": 10, "samples": [{"key": "a"}]}))
    with pytest.raises(FormatError, match="missing field 'blocks'"):
        ShardReader(str(shard))
    ipath.write_text(json.dumps({"blocklm_index": 7}))
    with pytest.raises(FormatError, match="unsupported index version"):
        ShardReader(str(shard))


def _rewrite_index(shard, fn):
    ipath = shard.with_name("shard-000000.index.json")
    obj = json.loads(ipath.read_bytes())
    fn(obj)
    ipath.write_text(json.dumps(obj))


def test_index_that_disagrees_with_the_shard(shard):
    ipath = shard.with_name("shard-000000.index.json")
    original = ipath.read_bytes()

    def swap(obj):  # sample 0's block claims bytes outside sample 0's range
        obj["samples"][0]["blocks"][0]["offset"] = obj["samples"][1]["blocks"][0]["offset"]
    _rewrite_index(shard, swap)
    with pytest.raises(FormatError, match="outside the sample's range"):
        ShardReader(str(shard))
    ipath.write_bytes(original)

    def shift(obj):  # every sample range starts one tar block late
        for s in obj["samples"]:
            s["offset"] += 512
            s["size"] -= 512
    _rewrite_index(shard, shift)
    with pytest.raises(IndexMismatchError, match="no member 'k1.blocks.json'"):
        ShardReader(str(shard))[1]


def test_index_pointing_inside_the_sample_range(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(Sample("a", [text_block("x" * 3000)]))
        w.write(Sample("b", [text_block("y" * 3000)]))
    shard = tmp_path / "shard-000000.tar"

    def wrong_member(obj):  # sample a's block now claims b's data (same sizes, other name)
        obj["samples"][0]["blocks"][0]["offset"] = obj["samples"][1]["blocks"][0]["offset"]
        obj["samples"][0]["size"] = obj["samples"][1]["offset"] + obj["samples"][1]["size"]
        obj["samples"].pop(1)
    _rewrite_index(shard, wrong_member)
    with pytest.raises(IndexMismatchError, match="no member 'a.0.text.txt.zst'"):
        ShardReader(str(shard))[0]


def test_huge_declared_shape_is_a_limit_error_without_allocation(shard):
    _rewrite_index(shard, lambda o: o["samples"][0]["blocks"][1].update(shape=[10**6, 10**6]))
    with pytest.raises(LimitError, match="1000000000000 elements"):
        ShardReader(str(shard))


def test_zstd_bomb_is_capped(tmp_path):
    from blocklm.formats import Limits
    with ShardWriter(tmp_path) as w:
        w.write(Sample("bomb", [bytes_block("x", (1,), b"\0" * 5_000_000)]))
    shard = str(tmp_path / "shard-000000.tar")
    with pytest.raises(LimitError, match="exceeds limit"):
        ShardReader(shard, limits=Limits(max_payload_bytes=1_000_000))
    # a frame that lies about its content size is refused before decompression
    data = zstandard.ZstdCompressor().compress(b"\0" * 1000)
    from blocklm.formats.index import BlockInfo, checksum
    from blocklm.formats.reader import BlockDecoder
    info = BlockInfo("x", (1,), "bytes", {}, 10, len(data), True, checksum(data))
    with pytest.raises(FormatError, match="frame declares 1000 bytes"):
        BlockDecoder("s").payload(data, info, "k", 0)


def _tar_with(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


@pytest.mark.parametrize("make,err,match", [
    (lambda: (tarfile.TarInfo("../x"), b"hi"), UnsafeMemberError, "unsafe"),
    (lambda: (tarfile.TarInfo("/etc/passwd"), b"hi"), UnsafeMemberError, "unsafe"),
    (lambda: (_link("a.blocks.json", tarfile.SYMTYPE), None), UnsafeMemberError, "symbolic link"),
    (lambda: (_link("a.blocks.json", tarfile.CHRTYPE), None), UnsafeMemberError, "device"),
    (lambda: (tarfile.TarInfo("stray.txt"), b"hi"), FormatError, "not part of a sample"),
])
def test_hostile_members(tmp_path, make, err, match):
    info, data = make()
    if data is not None:
        info.size = len(data)
    path = tmp_path / "evil.tar"
    path.write_bytes(_tar_with([(info, data)]))
    with open(path, "rb") as f, pytest.raises(err, match=match):
        list(scan_shard(f, shard=str(path)))
    with pytest.raises(err):
        build_index(str(path))


def _link(name, kind):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = "/etc/passwd"
    return info


def test_not_a_tar(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(b"hello world" * 100)
    with open(path, "rb") as f, pytest.raises(FormatError, match="garbled checksum|checksum mismatch"):
        list(scan_shard(f, shard=str(path)))


def test_manifest_paths_cannot_escape(tmp_path, shard):
    m = json.loads((shard.parent / "manifest.json").read_bytes())
    m["shards"][0]["shard"] = "../../etc/passwd"
    (shard.parent / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(FormatError, match="escapes the dataset"):
        list(iter_dataset(shard.parent))


def test_index_checksum_checked_through_manifest(shard):
    ipath = shard.with_name("shard-000000.index.json")
    idx = ShardIndex.from_bytes(ipath.read_bytes())
    ipath.write_bytes(idx.to_bytes() + b" ")
    with pytest.raises(ChecksumError, match="manifest"):
        list(iter_index(shard.parent))


def test_missing_index_is_rebuilt_by_scanning(shard):
    want = [s.key for s in ShardReader(str(shard))]
    shard.with_name("shard-000000.index.json").unlink()
    assert [s.key for s in ShardReader(str(shard))] == want


def test_missing_shard_is_a_typed_error_naming_it(tmp_path):
    from blocklm.formats import MissingFileError
    missing = str(tmp_path / "shard-000000.tar")
    with pytest.raises(MissingFileError) as e:
        load_index(missing)
    assert e.value.shard == missing


def test_an_unreadable_index_is_not_replaced_by_a_scan(shard, monkeypatch):
    from blocklm.formats import reader
    calls = []
    monkeypatch.setattr(reader, "build_index", lambda *a, **k: calls.append(a))

    class Flaky(reader.LocalSource):
        def read(self, offset, length):
            if self.name.endswith(".index.json"):
                raise FormatError("connection reset", shard=self.name)
            return super().read(offset, length)
    with pytest.raises(FormatError, match="connection reset"):
        load_index(str(shard), opener=Flaky)
    assert calls == []


def test_zstd_payload_is_decompressed_on_use_with_a_named_error(shard):
    import pickle

    from blocklm.formats.lazy import StoredBlock
    idx = load_index(str(shard))
    target = idx.samples[1].blocks[0]
    assert target.zstd
    good = ShardReader(str(shard))[1]
    blk = good.blocks[0]
    assert isinstance(blk, StoredBlock) and "compressed" in repr(blk)
    assert pickle.loads(pickle.dumps(blk)) == blk  # our own objects between worker processes
    assert blk.decode().startswith("sample 1 ")
    data = bytearray(shard.read_bytes())
    data[target.offset + target.stored - 6] ^= 0xFF  # deep inside the frame
    shard.write_bytes(bytes(data))
    lazy = ShardReader(str(shard), verify=False)[1]  # no checksum: the damage shows on use
    with pytest.raises(FormatError) as e:
        _ = lazy.blocks[0].payload
    assert (e.value.key, e.value.block) == ("k1", 0)
