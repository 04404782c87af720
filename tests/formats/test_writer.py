"""ShardWriter: determinism, rollover, atomic names, manifest totals, input validation."""

from __future__ import annotations

import json
import os

import pytest

from blocklm.formats import (
    FormatError,
    Sample,
    ShardWriter,
    bytes_block,
    iter_index,
    read_manifest,
    text_block,
)


def _samples(n: int) -> list[Sample]:
    return [Sample(f"k{i:03d}", [text_block("to be or not " * (i + 1)),
                                 bytes_block("video", (i, 2), bytes(range(i % 250)))])
            for i in range(n)]


def test_deterministic_bytes(tmp_path):
    for d in ("a", "b"):
        with ShardWriter(tmp_path / d, max_samples=4) as w:
            for s in _samples(10):
                w.write(s)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    assert "shard-000002.tar" in names and "manifest.json" in names
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


def test_rollover_by_samples_and_bytes(tmp_path):
    with ShardWriter(tmp_path / "s", max_samples=3, max_bytes=None) as w:
        for s in _samples(7):
            w.write(s)
    m = read_manifest(tmp_path / "s")
    assert [s.samples for s in m.shards] == [3, 3, 1]
    with ShardWriter(tmp_path / "b", max_bytes=8192) as w:
        for s in _samples(12):
            w.write(s)
    m = read_manifest(tmp_path / "b")
    assert len(m.shards) > 1 and m.samples == 12
    assert all(s.bytes <= 8192 or s.samples == 1 for s in m.shards)
    assert all((tmp_path / "b" / s.shard).stat().st_size == s.bytes for s in m.shards)


def test_manifest_totals_match_indexes(tmp_path):
    with ShardWriter(tmp_path, max_samples=2) as w:
        for s in _samples(5):
            w.write(s)
    m = read_manifest(tmp_path)
    blocks = {}
    for _, e in iter_index(tmp_path):
        for b in e.blocks:
            blocks[b.mode] = blocks.get(b.mode, 0) + 1
    assert m.samples == 5
    assert {k: v["blocks"] for k, v in m.modes.items()} == blocks == {"text": 5, "video": 5}
    raw = json.loads((tmp_path / "manifest.json").read_bytes())
    assert raw["samples"] == 5 and raw["blocklm_manifest"] == 1


def test_no_partial_shard_under_final_name(tmp_path):
    w = ShardWriter(tmp_path, max_samples=2)
    for s in _samples(3):
        w.write(s)
    # shard 0 is complete; shard 1 is open and must only exist under a temporary name
    assert sorted(os.listdir(tmp_path)) == ["shard-000000.index.json", "shard-000000.tar",
                                             "shard-000001.tar.tmp"]
    w.abort()
    assert "shard-000001.tar.tmp" not in os.listdir(tmp_path)
    assert "shard-000001.tar" not in os.listdir(tmp_path)


def test_exception_in_with_block_leaves_no_partial_shard(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path) as w:
            w.write(_samples(1)[0])
            raise RuntimeError("crash")
    assert os.listdir(tmp_path) == []


def test_duplicate_key_rejected(tmp_path):
    with ShardWriter(tmp_path) as w:
        w.write(Sample("a", []))
        with pytest.raises(FormatError, match="duplicate key"):
            w.write(Sample("a", []))


@pytest.mark.parametrize("key", ["a.b", "../x", "/abs", "", "x" * 65, "a//b", "ü"])
def test_invalid_keys_rejected(key):
    with pytest.raises(FormatError, match="invalid sample key"):
        Sample(key, [])


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "Text"}, "invalid mode"), ({"mode": "a" * 17}, "invalid mode"),
    ({"codec": "PNG"}, "invalid codec"), ({"shape": (-1,)}, "non-negative"),
    ({"meta": {"Bad": 1}}, "metadata name"), ({"meta": {"x": [1]}}, "must be a string"),
    ({"meta": {"x": float("nan")}}, "finite"), ({"meta": {"x": "y" * 5000}}, "4096"),
])
def test_invalid_blocks_rejected(kwargs, match):
    fields = {"mode": "text", "shape": (1,), "codec": "utf8", "payload": b"a", "meta": {}}
    fields.update(kwargs)
    from blocklm.formats import Block
    with pytest.raises(FormatError, match=match):
        Block(**fields)


def test_read_blocks_do_not_share_metadata(tmp_path):
    from blocklm.formats import iter_dataset
    with ShardWriter(tmp_path) as w:
        for i in range(2):
            w.write(Sample(f"m{i}", [text_block("a", meta={"source": "x"})]))
    a, b = iter_dataset(tmp_path)
    a.blocks[0].meta["source"] = "changed"
    assert b.blocks[0].meta == {"source": "x"}


# --------------------------------------------------------------- fast paths of the writer side

@pytest.mark.parametrize("name", ["a.b", "k/sub.0.audio.wav.zst", "x" * 96 + ".bin",
                                  "dir/" * 25 + "x.bin"])  # over 100: tarfile, prefix field
@pytest.mark.parametrize("size", [0, 1, 511, 512, 12_345_678, 8**11 - 1])
def test_template_header_equals_tarfile(name, size):
    from blocklm.formats.tar import _tarfile_header, member_header, parse_header

    assert member_header(name, size) == _tarfile_header(name, size)
    if len(name) <= 100:
        assert parse_header(member_header(name, size)) == (name, size)


@pytest.mark.parametrize("max_bytes", [None, 3000, 9000])
@pytest.mark.parametrize("source", ["file", "memory"])
def test_write_span_equals_write(tmp_path, max_bytes, source):
    """Samples spilled to a file (or an in-memory file: copy_file_range refuses to cross file
    systems, sendfile copies) and copied with write_span give the same shards as write()."""
    from blocklm.formats.writer import SampleEncoder

    if source == "memory" and not hasattr(os, "memfd_create"):
        pytest.skip("no memfd_create here")
    samples = _samples(12)
    with ShardWriter(tmp_path / "a", max_bytes=max_bytes) as w:
        for s in samples:
            w.write(s)
    enc = SampleEncoder()
    spill = [tmp_path / "spill0", tmp_path / "spill1"]
    entries: list[list] = [[], []]
    for i, s in enumerate(samples):  # two spill files, as two workers would write them
        parts, entry = enc.encode_parts(s)
        with open(spill[i // 6], "ab") as f:
            f.writelines(parts)
        entries[i // 6].append(entry)
    with ShardWriter(tmp_path / "b", max_bytes=max_bytes) as w:
        for path, ents in zip(spill, entries):
            fd = os.open(path, os.O_RDONLY)
            if source == "memory":
                mem = os.memfd_create("spill")
                os.write(mem, path.read_bytes())
                os.close(fd)
                fd = mem
            off = 0
            for e in ents:
                size = e.size
                w.write_span(fd, off, e)
                off += size
            w.flush_spans()
            os.close(fd)
    names = sorted(os.listdir(tmp_path / "a"))
    assert names == sorted(os.listdir(tmp_path / "b"))
    for n in names:
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
@pytest.mark.parametrize("channels,frames", [(1, 1), (2, 777), (6, 50)])
def test_wav_header_probe_equals_libsndfile(subtype, channels, frames):
    """The RIFF fast path of probe_audio reports what libsndfile reports."""
    import io

    import numpy as np
    import soundfile as sf

    from blocklm.formats.wav import probe_pcm_wav

    buf = io.BytesIO()
    sf.write(buf, np.zeros((frames, channels)), 22050, subtype=subtype, format="WAV")
    data = buf.getvalue()
    info = sf.info(io.BytesIO(data))
    assert probe_pcm_wav(data) == ((frames, channels),
                                    {"sample_rate": 22050, "subtype": info.subtype})
    # odd chunks, RIFX, extensible headers or a streamed data size go to libsndfile instead
    odd = data[:12] + b"junk\x03\x00\x00\x00abc" + data[12:]
    assert probe_pcm_wav(odd) is None
    assert probe_pcm_wav(data[:40] + b"\0\0\0\0" + data[44:]) is None


def test_sync_ahead_keeps_the_bytes_and_stops_on_abort(tmp_path, monkeypatch):
    """Background fdatasyncs every few bytes change nothing on disk; a slow one is not started
    twice; abort waits for it before the file is closed."""
    import threading
    import time

    from blocklm.formats import writer as writer_mod

    samples = _samples(30)
    with ShardWriter(tmp_path / "a", max_samples=12) as w:
        for s in samples:
            w.write(s)
    monkeypatch.setattr(writer_mod, "SYNC_AHEAD", 1000)
    with ShardWriter(tmp_path / "b", max_samples=12) as w:
        for s in samples:
            w.write(s)
    for n in sorted(os.listdir(tmp_path / "a")):
        assert (tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes(), n
    release, calls, real = threading.Event(), [], os.fdatasync

    def slow_fdatasync(fd):
        calls.append(fd)
        release.wait(10)
        real(fd)

    monkeypatch.setattr(writer_mod.os, "fdatasync", slow_fdatasync)
    w = ShardWriter(tmp_path / "c", max_samples=100)
    for s in samples:  # every write passes SYNC_AHEAD: the running sync is left alone
        w.write(s)
    for _ in range(500):  # the thread runs when the scheduler gets to it
        if calls:
            break
        time.sleep(0.01)
    assert len(calls) == 1 and w._syncer.locked()
    threading.Timer(0.2, release.set).start()
    w.abort()  # waits for the sync before closing its file
    assert release.is_set() and w._syncer is None
    assert not os.listdir(tmp_path / "c")


def test_a_background_sync_error_is_raised(tmp_path, monkeypatch):
    """A write error seen by a sync-ahead fdatasync fails the writer (the kernel reports it to
    one sync call only, so the final fsync would not see it)."""
    import errno

    from blocklm.formats import writer as writer_mod

    def failing_fdatasync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writer_mod, "SYNC_AHEAD", 1000)
    monkeypatch.setattr(writer_mod.os, "fdatasync", failing_fdatasync)
    w = ShardWriter(tmp_path / "d", max_samples=100)
    with pytest.raises(OSError, match="Input/output error"):
        for s in _samples(30):
            w.write(s)
        w.close()
    w.abort()
    assert not [n for n in os.listdir(tmp_path / "d") if n.endswith(".tar")]


def test_shard_and_index_are_both_synced_before_either_is_renamed(tmp_path, monkeypatch):
    """The shard's final fsync runs beside the index's: both on disk before the index and
    then the shard get their final names; a failed shard fsync leaves neither name, no index
    temporary, and the error raised."""
    import errno

    from blocklm.formats import writer as writer_mod

    events, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}").rsplit("/", 1)[1]))
        real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(b)))
        real_replace(a, b)

    monkeypatch.setattr(writer_mod.os, "fsync", fsync)
    monkeypatch.setattr(writer_mod.os, "replace", replace)
    with ShardWriter(tmp_path / "a", max_samples=4) as w:
        for s in _samples(5):
            w.write(s)
    first = events[:4]
    assert sorted(first[:2]) == [("fsync", "shard-000000.index.json.tmp"),
                                 ("fsync", "shard-000000.tar.tmp")]
    assert first[2:] == [("replace", "shard-000000.index.json"), ("replace", "shard-000000.tar")]

    def failing(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tar.tmp"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(writer_mod.os, "fsync", failing)
    w = ShardWriter(tmp_path / "b", max_samples=4)
    with pytest.raises(OSError, match="Input/output error"):
        for s in _samples(5):
            w.write(s)
    w.abort()
    assert os.listdir(tmp_path / "b") == []


_METAS = [{}, {"sample_rate": 8000, "subtype": "PCM_16"}, {"x": True}, {"x": 1}, {"x": 1.0},
          {"x": -0.0}, {"x": None}, {"b": "ü \"quote\" \\ /\n\t\x01", "a": 2**70},
          {"z": 1e300, "y": -3, "x": "日本"}]


def test_fast_headers_and_index_equal_canonical_json():
    """formats/headers.py builds the same bytes as json.dumps (sample headers, index entries),
    with metadata of every scalar type, including values that are equal as dict keys (1, True,
    1.0) but not as JSON, each seen twice (the second time from the cache)."""
    from blocklm.formats.block import canonical_json
    from blocklm.formats.headers import header_bytes, index_bytes
    from blocklm.formats.index import BlockInfo, IndexEntry, ShardIndex, sample_header_bytes

    entries = []
    for rep in range(2):
        for i, meta in enumerate(_METAS):
            blocks = [BlockInfo("audio", (i, 1), "wav", dict(meta), 10 * i, 7 * i, bool(i % 2),
                                f"{i:016x}", 1536 + i),
                      BlockInfo("text", (), "utf8", {}, 0, 0, False, "0" * 16, 9_000_000_000)]
            key = f"dir/k-{rep}_{i}"
            assert header_bytes(key, blocks) == sample_header_bytes(key, blocks)
            entries.append(IndexEntry(key, 512 * i, 4096 + i, blocks))
    assert index_bytes("s-000001.tar", 123_456, entries) == \
        ShardIndex("s-000001.tar", 123_456, entries).to_bytes()
    assert canonical_json({"x": True}) != canonical_json({"x": 1})  # what the cache must keep


def test_small_and_large_payloads_compress_by_size_alone():
    """SPEC.md: below 64 KiB level 1 with min match 7, from 64 KiB level 3; both decompress."""
    import zstandard

    from blocklm.formats.writer import ZSTD_SMALL, SampleEncoder

    enc = SampleEncoder()
    small, large = b"abcdefgh" * 1000, bytes(range(256)) * (ZSTD_SMALL // 256 + 1)
    l1 = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters
                                  .from_level(1, min_match=7, write_content_size=True,
                                              write_checksum=False))
    l3 = zstandard.ZstdCompressor(level=3, write_content_size=True, write_checksum=False)
    assert enc.compress(small) == l1.compress(small) == SampleEncoder().compress(small)
    assert enc.compress(large) == l3.compress(large)
    for data in (small, large):
        assert zstandard.ZstdDecompressor().decompress(enc.compress(data)) == data


def test_index_from_templates_is_canonical(tmp_path):
    """The index the writer assembles from per-sample templates (write) and from entries
    (write_encoded without one) is the canonical JSON of what a reader loads back."""
    from blocklm.formats.index import ShardIndex
    from blocklm.formats.writer import SampleEncoder

    samples, enc = _samples(9), SampleEncoder()
    for d, with_template in (("t", True), ("e", False)):
        with ShardWriter(tmp_path / d, max_samples=4) as w:
            for s in samples:
                parts, entry, template = enc.encode_indexed(s)
                w.write_encoded(parts, entry, template if with_template else None)
    for name in sorted(os.listdir(tmp_path / "t")):
        data = (tmp_path / "t" / name).read_bytes()
        assert data == (tmp_path / "e" / name).read_bytes(), name
        if name.endswith(".index.json"):
            assert ShardIndex.from_bytes(data).to_bytes() == data


def test_one_block_encoder_equals_the_general_one(corpora):
    """SampleEncoder's one-block layout gives the bytes, entry and index template of the general
    path, compressed or not, for any codec, metadata and key length."""
    from blocklm.formats import Block, image_file_block
    from blocklm.formats.encoder import SampleEncoder

    enc = SampleEncoder()
    png = corpora / "images/set14/img_003.png"
    blocks = [text_block("to be or not " * 40), text_block(""), bytes_block("data", (3,), b"abc"),
              Block("audio", (2, 1), "pcm16", b"\0\1" * 2, {"sample_rate": 8000, "x": 1.5})]
    blocks.append(image_file_block(png.read_bytes()))
    for b in blocks:
        for key in ("k", "dir/sub-" + "x" * 50):
            s = Sample(key, [b])
            one = enc.encode_indexed(s)
            many = enc._encode_many(key, s, False)
            assert one[0] == many[0] and one[1] == many[1] and one[2] == many[2]
