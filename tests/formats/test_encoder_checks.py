"""The converter's structural checks with the faster CRC-32 (zlib-ng) and with zlib's fallback."""

from __future__ import annotations

import io
import zlib

import pytest

from blocklm.formats import CodecError, check_integrity
from blocklm.formats import integrity


@pytest.fixture(scope="module")
def png() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(ctype: bytes, body: bytes) -> bytes:
    return (len(body).to_bytes(4, "big") + ctype + body
            + zlib.crc32(ctype + body).to_bytes(4, "big"))


def test_fast_crc_equals_zlib():
    data = bytes(range(256)) * 4099
    for n in (0, 1, 7, 64, 5000, len(data)):
        assert integrity._crc32(data[:n]) == zlib.crc32(data[:n])
        assert integrity._crc32(memoryview(data)[3:n]) == zlib.crc32(data[3:n])


@pytest.mark.parametrize("crc", ["fast", "zlib"])
def test_png_checks_with_either_crc(png, crc, monkeypatch):
    if crc == "zlib":
        monkeypatch.setattr(integrity, "_crc32", zlib.crc32)
    check_integrity("png", png)
    bad = bytearray(png)
    bad[len(png) // 2] ^= 0x01  # inside the IDAT data
    with pytest.raises(CodecError, match="CRC mismatch in chunk IDAT"):
        check_integrity("png", bytes(bad))


def test_png_whose_first_chunk_is_idat_is_rejected(png):
    """The first-chunk rule holds for an IDAT too (the chunk loop tests IDAT first)."""
    idat = _chunk(b"IDAT", zlib.compress(b"\0" * 10))
    iend = _chunk(b"IEND", b"")
    with pytest.raises(CodecError, match="first chunk is not a 13-byte IHDR"):
        check_integrity("png", png[:8] + idat + png[8:])
    with pytest.raises(CodecError, match="first chunk is not a 13-byte IHDR"):
        check_integrity("png", png[:8] + idat + iend)
