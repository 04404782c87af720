"""The converter's lean path: SampleEncoder.encode_packed / encode_file and
ShardWriter.write_packed / span_packed give exactly what encode_indexed and write() give."""

from __future__ import annotations

import os

import pytest

from blocklm.formats import Block, Sample, ShardWriter, bytes_block, text_block
from blocklm.formats.encoder import SampleEncoder


def _samples(corpora) -> list[Sample]:
    from blocklm.formats import audio_file_block, image_file_block

    png = (corpora / "images/set14/img_003.png").read_bytes()
    wav = next(iter(sorted((corpora / "audio").rglob("*.wav")))).read_bytes()
    out = []
    for i in range(14):
        blocks = [
            [text_block("to be or not " * (i + 1))],
            [text_block(""), bytes_block("video", (i, 2), bytes(range(i % 250)))],
            [Block("audio", (2, 1), "pcm16", b"\0\1" * 2, {"sample_rate": 8000, "x": 1.5})],
            [Block("data", (1,), "bytes", b"x", {"flag": True, "n": 1, "s": "a b"})],
            [audio_file_block(wav)],
            [image_file_block(png), text_block("a caption")],
            [image_file_block(png)],
        ][i % 7]
        key = f"k{i:03d}" if i % 3 else f"dir/sub-{i}-" + "x" * 50
        out.append(Sample(key, blocks))
    return out


def test_packed_encoding_equals_encode_indexed(corpora):
    enc = SampleEncoder()
    for s in _samples(corpora):
        parts, entry, template = enc.encode_indexed(s)
        packed = enc.encode_packed(s)
        totals = tuple((b.mode, b.size, b.stored) for b in entry.blocks)
        assert packed == (parts, entry.size, template, totals), s.key
        if len(s.blocks) == 1:
            assert enc.encode_file(s.key, s.blocks[0]) == packed


def test_encode_file_checks_the_key():
    from blocklm.formats import FormatError

    with pytest.raises(FormatError, match="invalid sample key"):
        SampleEncoder().encode_file("a.b", text_block("x"))


@pytest.mark.parametrize("max_bytes,max_samples", [(None, None), (30_000, None), (None, 3),
                                                   (400_000, 5)])
def test_write_packed_and_span_packed_equal_write(corpora, tmp_path, max_bytes, max_samples):
    """Shards, indexes and manifest from write_packed and span_packed (mixed, runs of spans
    from two files broken by direct writes) are byte for byte those of write()."""
    samples, enc = _samples(corpora), SampleEncoder()
    kw = {"max_bytes": max_bytes, "max_samples": max_samples}
    with ShardWriter(tmp_path / "ref", **kw) as w:
        for s in samples:
            w.write(s)
    spills = [tmp_path / "s0", tmp_path / "s1"]
    fds = []
    for path in spills:
        path.write_bytes(b"")
        fds.append(os.open(path, os.O_RDONLY))
    offsets = [0, 0]
    with ShardWriter(tmp_path / "new", **kw) as w:
        for i, s in enumerate(samples):
            parts, size, template, totals = enc.encode_packed(s)
            if i % 4 == 3:  # written directly
                w.write_packed(parts, size, s.key, template, totals)
                continue
            j = (i // 2) % 2  # spans alternate between two files, two at a time
            with open(spills[j], "ab") as f:
                f.writelines(parts)
            w.span_packed(fds[j], offsets[j], size, s.key, template, totals)
            offsets[j] += size
        w.flush_spans()
    for fd in fds:
        os.close(fd)
    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == sorted(os.listdir(tmp_path / "new")) and len(names) > 2
    for n in names:
        assert (tmp_path / "ref" / n).read_bytes() == (tmp_path / "new" / n).read_bytes(), n


def test_write_packed_rejects_a_duplicate_key_and_a_closed_writer(tmp_path):
    from blocklm.formats import FormatError

    enc = SampleEncoder()
    s = Sample("k", [text_block("x")])
    w = ShardWriter(tmp_path)
    w.write_packed(*enc.encode_packed(s)[:2], "k", *enc.encode_packed(s)[2:])
    with pytest.raises(FormatError, match="duplicate key"):
        w.write_packed(*enc.encode_packed(s)[:2], "k", *enc.encode_packed(s)[2:])
    w.close()
    with pytest.raises(FormatError, match="closed"):
        w.write_packed(*enc.encode_packed(s)[:2], "k2", *enc.encode_packed(s)[2:])
