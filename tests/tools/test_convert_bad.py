"""Every bad input is rejected with its reason, the job goes on, and the report accounts for all."""

from __future__ import annotations

import io
import json
import os
import struct
import zlib

import numpy as np
import pytest

from blocklm.formats import iter_dataset
from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import StrictStop, run_convert


def _tiff_with_bad_compression() -> bytes:
    """A TIFF whose header reads fine but whose compression scheme (tag 259) is unknown."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buf, "TIFF")
    data = bytearray(buf.getvalue())
    (ifd,) = struct.unpack_from("<I", data, 4)
    (n,) = struct.unpack_from("<H", data, ifd)
    for i in range(n):
        at = ifd + 2 + 12 * i
        if struct.unpack_from("<H", data, at)[0] == 259:
            struct.pack_into("<H", data, at + 8, 60000)
    return bytes(data)


@pytest.fixture
def bad_dir(image_dir, tmp_path):
    """The good images of ``image_dir`` plus one file for each kind of bad input."""
    import soundfile as sf

    good = (image_dir / "img_001.png").read_bytes()
    (image_dir / "truncated.png").write_bytes(good[: len(good) // 2])
    corrupt = bytearray(good)
    corrupt[len(corrupt) // 2: len(corrupt) // 2 + 64] = b"\x55" * 64
    (image_dir / "corrupt.png").write_bytes(bytes(corrupt))
    (image_dir / "liar.jpg").write_bytes(b"this is not a jpeg at all\n")
    (image_dir / "weird.tif").write_bytes(_tiff_with_bad_compression())
    (image_dir / "empty.png").write_bytes(b"")
    buf = io.BytesIO()
    sf.write(buf, np.zeros((0, 1), np.int16), 8000, format="WAV")
    (image_dir / "silent.wav").write_bytes(buf.getvalue())
    buf = io.BytesIO()
    sf.write(buf, np.ones((4000, 1), np.int16), 8000, format="WAV")
    (image_dir / "cut.wav").write_bytes(buf.getvalue()[:5000])  # reads as a shorter clip
    (image_dir / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    os.symlink(image_dir / "gone.png", image_dir / "dangling.png")
    (image_dir / "data.xyz").write_bytes(b"?")
    (image_dir / ".hidden").write_bytes(b"skipped")
    return image_dir


EXPECT = {
    "truncated.png": "", "corrupt.png": "", "liar.jpg": "not a readable image",
    "weird.tif": "", "empty.png": "empty file", "silent.wav": "no frames",
    "cut.wav": "truncated WAV",
    "latin1.txt": "not UTF-8", "dangling.png": "unreadable", "data.xyz": "unsupported file type",
}


@pytest.mark.parametrize("deep", [False, True], ids=["structural", "deep-check"])
def test_bad_files_rejected_and_good_ones_kept(bad_dir, tmp_path, run_cli, deep):
    out = tmp_path / "out"
    res = run_cli("convert", bad_dir, "--out", out, "-j", "2", "-q", *(["--deep-check"] * deep))
    assert res.exit_code == 3, res.output
    rep = json.loads((out / "report.json").read_text())
    reasons = {os.path.basename(r["path"]): r["reason"] for r in rep["rejected"]}
    assert set(reasons) == set(EXPECT)
    for name, want in EXPECT.items():
        assert want in reasons[name], (name, reasons[name])
        assert any(line.startswith("rejected: ") and name in line
                   for line in res.stderr.splitlines())
    assert rep["inputs"] == rep["samples"] + len(rep["rejected"]) and rep["samples"] == 4
    assert any(p.endswith(".hidden") for p in rep["skipped"])
    assert len(list(iter_dataset(out))) == 4
    assert run_cli("verify", out, "-q").exit_code == 0


def _png_with_bad_deflate_and_good_crcs(png: bytes) -> bytes:
    """``png`` with bytes of its first IDAT's compressed data overwritten and the chunk's CRC
    recomputed: structurally sound, but the pixels do not decompress."""
    at = 8
    while png[at + 4:at + 8] != b"IDAT":
        at += 12 + int.from_bytes(png[at:at + 4], "big")
    n = int.from_bytes(png[at:at + 4], "big")
    bad = bytearray(png)
    bad[at + 8 + n // 2: at + 8 + n // 2 + 64] = b"\x55" * 64
    bad[at + 8 + n:at + 12 + n] = zlib.crc32(bad[at + 4:at + 8 + n]).to_bytes(4, "big")
    return bytes(bad)


def test_deep_check_decodes_what_the_structural_check_passes(image_dir, tmp_path, run_cli):
    """The structural check does not inflate PNG data: a file rebuilt with valid CRCs around
    damaged compressed data passes it (the documented limit); --deep-check decodes and rejects it.
    The good files give the same shards either way."""
    png = (image_dir / "img_001.png").read_bytes()
    (image_dir / "recrc.png").write_bytes(_png_with_bad_deflate_and_good_crcs(png))
    res = run_cli("convert", image_dir, "--out", tmp_path / "a", "-j", "1", "-q")
    assert res.exit_code == 0, res.output
    res = run_cli("convert", image_dir, "--out", tmp_path / "b", "-j", "1", "-q", "--deep-check")
    assert res.exit_code == 3 and "recrc.png: image does not decode" in res.stderr
    (image_dir / "recrc.png").unlink()
    run_cli("convert", image_dir, "--out", tmp_path / "c", "-j", "1", "-q")
    run_cli("convert", image_dir, "--out", tmp_path / "d", "-j", "1", "-q", "--deep-check")
    assert (tmp_path / "c/shard-000000.tar").read_bytes() == \
        (tmp_path / "d/shard-000000.tar").read_bytes()


def test_text_errors_replace_keeps_the_text(bad_dir, tmp_path):
    rep = run_convert([str(bad_dir / "latin1.txt")], tmp_path / "o",
                      ConvertOptions(workers=1, quiet=True, text_errors="replace"))
    assert rep.rejected == []
    assert next(iter_dataset(tmp_path / "o")).blocks[0].decode() == "caf\ufffd cr\ufffdme"


def test_strict_stops_at_first_bad_input(bad_dir, tmp_path, run_cli):
    res = run_cli("convert", bad_dir, "--out", tmp_path / "o", "--strict", "-j", "1", "-q")
    assert res.exit_code == 1 and "stopped (--strict)" in res.stderr
    with pytest.raises(StrictStop):
        run_convert([str(bad_dir)], tmp_path / "o2", ConvertOptions(workers=1, strict=True,
                                                                    quiet=True))
    assert not [p for p in os.listdir(tmp_path / "o2") if p.endswith(".tmp")]


def test_broken_manifest_lines(image_dir, tmp_path):
    lines = [
        '[{"mode": "image", "path": "imgs/img_001.png"}, {"mode": "text", "text": "ok"}]',
        '{"blocks": [{"mode": "image", "path": "imgs/img_001.png"}',  # cut JSON
        '[{"path": "imgs/img_002.png"}]',  # no mode
        "[]",
        '[{"mode": "image", "path": "imgs/nope.png"}]',
        '[{"mode": "image", "path": "../../etc/passwd"}]',
        '[{"mode": "image", "path": "/etc/passwd"}]',
        '{"key": "bad.key", "blocks": [{"mode": "text", "text": "x"}]}',
        '[{"mode": "text"}]',
        '[{"mode": "image", "path": "imgs/img_002.png"}, {"mode": "audio", "path": "imgs/'
        'img_003.png"}]',  # a block that is not what its mode says
    ]
    man = tmp_path / "m.jsonl"
    man.write_text("\n".join(lines) + "\n")
    rep = run_convert([str(man)], tmp_path / "o", ConvertOptions(workers=2, quiet=True))
    reasons = [r["reason"] for r in rep.rejected]
    assert rep.samples == 1 and rep.inputs == len(lines) and len(reasons) == len(lines) - 1
    for want in ("not valid JSON", "expected an object with a 'mode'", "non-empty list",
                 "does not exist", "escapes the manifest's folder", "is absolute",
                 "invalid sample key", "needs a 'path' or a 'text'",
                 "block 1 (" + str(image_dir / "img_003.png") + "): not a readable audio"):
        assert any(want in r for r in reasons), (want, reasons)


def test_jsonl_text_bad_lines(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b'{"text": "good"}\n{"text": 5}\nnot json\n{"other": "x"}\n')
    rep = run_convert([str(p)], tmp_path / "o", ConvertOptions(workers=1, quiet=True))
    assert rep.samples == 1 and [r["path"].rsplit(":", 1)[1] for r in rep.rejected] == \
        ["2", "3", "4"]


def test_missing_input_is_reported(tmp_path):
    rep = run_convert([str(tmp_path / "nothing.png")], tmp_path / "o",
                      ConvertOptions(workers=1, quiet=True))
    assert rep.rejected == [{"path": str(tmp_path / "nothing.png"), "reason": "does not exist"}]


def test_forced_kind_rejects_what_is_not_that_kind(small_text, tmp_path, run_cli):
    res = run_cli("convert", small_text, "--kind", "images", "--out", tmp_path / "o", "-q")
    assert res.exit_code == 3 and "not a readable image" in res.stderr


def test_one_file_fast_path_equals_the_general_path(bad_dir, audio_dir):
    """convert_items' path for one-file samples gives the bytes, size, key, index text and totals
    of the general path, and the same rejection reasons, on good and bad files of every kind
    here."""
    from blocklm.tools import convert_items as ci
    from blocklm.tools.convert_keys import KeyAllocator
    from blocklm.tools.convert_options import ConvertOptions
    from blocklm.tools.convert_sources import iter_input

    items = [it for d in (bad_dir, audio_dir)
             for it in iter_input(str(d), ConvertOptions(), KeyAllocator(), [])]
    fast = [it for it in items if len(it.parts) == 1 and it.parts[0].how in ("image", "audio")]
    assert len(fast) >= 12
    outcomes = set()
    for it in fast:
        got = []
        for encode in (ci.encode_item, lambda it, _: ci._encode_general(it, False)):
            try:
                got.append(encode(it, False))  # ((parts, size, key, template, totals), payload)
            except ci.Rejected as e:
                got.append(str(e))
        assert got[0] == got[1], it.source
        outcomes.add(isinstance(got[0], str))
    assert outcomes == {True, False}


@pytest.mark.parametrize("size", [0, 1, 7000, (1 << 16) - 1, 1 << 16, (1 << 16) + 1, 300_001])
def test_read_part_reads_files_and_pipes_whole(tmp_path, size):
    """read_part: one read for a small file, a second read from the start for a large one, and
    a pipe (whose reads may be short) read to its end."""
    import threading

    from blocklm.tools.convert_items import Part, read_part

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    f = tmp_path / "f.bin"
    f.write_bytes(data)
    assert read_part(Part("bytes", "data", str(f))) == data
    fifo = tmp_path / "p.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb", buffering=0) as w:
            for at in range(0, size, 5000):  # short writes: short reads on the other side
                w.write(data[at:at + 5000])

    t = threading.Thread(target=feed)
    t.start()
    assert read_part(Part("bytes", "data", str(fifo))) == data
    t.join()
