"""Structural integrity checks (formats/integrity.py): real files pass, damaged ones are caught."""

from __future__ import annotations

import io
import zlib

import pytest

from blocklm.formats import CodecError, check_integrity
from blocklm.formats.integrity import INTEGRITY_CODECS


@pytest.fixture(scope="module")
def png(corpora) -> bytes:
    return (corpora / "images/bsd100/img_001.png").read_bytes()


@pytest.fixture(scope="module")
def wav(corpora) -> bytes:
    return sorted((corpora / "audio/fsdd").glob("*.wav"))[0].read_bytes()


def _jpeg(png: bytes, **save) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.open(io.BytesIO(png)).convert("RGB").save(buf, "JPEG", quality=85, **save)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg(png) -> bytes:
    return _jpeg(png)


def _chunks(png: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of every PNG chunk."""
    out, at = [], 8
    while at < len(png):
        length = int.from_bytes(png[at:at + 4], "big")
        out.append((at, png[at + 4:at + 8], length))
        at += 12 + length
    return out


def _idat(png: bytes) -> tuple[int, int]:
    return next((at, n) for at, t, n in _chunks(png) if t == b"IDAT")


def test_real_files_pass(corpora, png, wav, jpeg):
    for p in sorted((corpora / "images").rglob("*.png"))[:20]:
        check_integrity("png", p.read_bytes())
    check_integrity("png", png)
    check_integrity("wav", wav)
    check_integrity("jpeg", jpeg)
    check_integrity("jpeg", _jpeg(png, progressive=True, optimize=True))  # several scans
    from PIL import Image

    exif = Image.Exif()
    exif[0x010E] = "a description"
    check_integrity("jpeg", _jpeg(png, exif=exif.tobytes()))


def test_png_flipped_byte_in_idat(png):
    at, n = _idat(png)
    bad = bytearray(png)
    bad[at + 8 + n // 2] ^= 0x01
    with pytest.raises(CodecError, match="CRC mismatch in chunk IDAT"):
        check_integrity("png", bytes(bad))


@pytest.mark.parametrize("cut", [0.0, 0.001, 0.01, 0.25, 0.5, 0.9, 0.999])
def test_png_cut_anywhere(png, cut):
    with pytest.raises(CodecError, match="PNG"):
        check_integrity("png", png[:int(len(png) * cut)])


def test_png_cut_at_every_chunk_boundary(png):
    for at, _, _ in _chunks(png):  # the file before IEND: every chunk whole, no IEND
        with pytest.raises(CodecError, match="truncated PNG"):
            check_integrity("png", png[:at])
    with pytest.raises(CodecError, match="truncated PNG"):
        check_integrity("png", png[:-1])  # IEND's CRC cut short


def test_png_missing_iend(png):
    at = _chunks(png)[-1][0]
    assert png[at + 4:at + 8] == b"IEND"
    with pytest.raises(CodecError, match="before the IEND chunk"):
        check_integrity("png", png[:at])


def test_png_bytes_after_iend_are_ignored(png):
    check_integrity("png", png + b"\0" * 16)


def test_png_structure_errors(png):
    with pytest.raises(CodecError, match="bad signature"):
        check_integrity("png", b"\x89PNX" + png[4:])
    # a chunk whose length field is damaged no longer lines up with its CRC or the file's end
    at, _ = _idat(png)
    bad = bytearray(png)
    bad[at + 1] ^= 0x40
    with pytest.raises(CodecError, match="PNG"):
        check_integrity("png", bytes(bad))
    # no IDAT: IHDR then IEND, both with good CRCs
    ihdr = png[8:8 + 25]
    iend = (0).to_bytes(4, "big") + b"IEND" + zlib.crc32(b"IEND").to_bytes(4, "big")
    with pytest.raises(CodecError, match="no IDAT"):
        check_integrity("png", png[:8] + ihdr + iend)
    with pytest.raises(CodecError, match="first chunk is not a 13-byte IHDR"):
        check_integrity("png", png[:8] + iend)


def test_jpeg_without_eoi(jpeg):
    assert jpeg[-2:] == b"\xff\xd9"
    with pytest.raises(CodecError, match="without an EOI marker"):
        check_integrity("jpeg", jpeg[:-2])


@pytest.mark.parametrize("cut", [0.001, 0.01, 0.1, 0.5, 0.99])
def test_jpeg_cut_anywhere(jpeg, png, cut):
    progressive = _jpeg(png, progressive=True)
    for data in (jpeg, progressive):
        with pytest.raises(CodecError, match="JPEG"):
            check_integrity("jpeg", data[:int(len(data) * cut)])


def test_jpeg_structure_errors(jpeg):
    with pytest.raises(CodecError, match="no SOI"):
        check_integrity("jpeg", b"\x00" + jpeg[1:])
    bad = bytearray(jpeg)
    bad[2] = 0x00  # the first segment's marker
    with pytest.raises(CodecError, match="expected a marker at byte 2"):
        check_integrity("jpeg", bytes(bad))


def test_wav_checks(wav):
    check_integrity("wav", wav + b"LIST")  # a cut chunk after the audio data does not matter
    with pytest.raises(CodecError, match="truncated WAV: the data chunk declares"):
        check_integrity("wav", wav[:-100])
    with pytest.raises(CodecError, match="no RIFF/WAVE header"):
        check_integrity("wav", b"RIFX" + wav[4:8] + b"AVI " + wav[12:])
    with pytest.raises(CodecError, match="truncated WAV: chunk 'fmt ' at byte 12 declares 16"):
        check_integrity("wav", wav[:30])
    assert wav[36:40] == b"data"
    with pytest.raises(CodecError, match="truncated WAV: ends at byte 40 before the data chunk"):
        check_integrity("wav", wav[:40])
    with pytest.raises(CodecError, match="data chunk comes before the fmt chunk"):
        check_integrity("wav", wav[:12] + wav[36:])


def test_codecs_without_a_check_say_so():
    assert INTEGRITY_CODECS == {"png", "jpeg", "wav"}
    for codec in ("flac", "gif", "webp", "tiff", "mp3"):
        with pytest.raises(NotImplementedError, match="decode it fully"):
            check_integrity(codec, b"anything")
