"""The converter's structural checks with the faster CRC-32 (zlib-ng) and with zlib's fallback."""

from __future__ import annotations

import io
import zlib

import pytest

from blocklm.formats import CodecError, check_integrity, integrity


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


def test_a_wav_the_plain_probe_accepts_passes_the_structure_check(corpora):
    """convert_items skips check_integrity("wav") when the plain-WAV probe accepted the file:
    on cut, grown and byte-damaged variants of real clips (and extra chunks), whatever the probe
    accepts the check accepts, and the probe still reads the good files."""
    import random
    import struct

    from blocklm.formats.codecs import plain_wav_block
    from blocklm.formats.wav import probe_pcm_wav

    rng = random.Random(0)
    wavs = [p.read_bytes() for p in sorted((corpora / "audio").rglob("*.wav"))[:20]]
    variants = list(wavs)
    for w in wavs:
        extra = b"LIST" + struct.pack("<I", 6) + b"abcdef"
        variants.append(w[:12] + extra + w[12:])  # a chunk before fmt
        variants += [w[:cut] for cut in range(0, 80)] + [w[:-1], w[:-2], w + b"\0"]
        for _ in range(60):
            bad = bytearray(w)
            at = rng.randrange(0, 60)
            bad[at] = rng.randrange(256)
            variants.append(bytes(bad))
    accepted = 0
    for v in variants:
        if probe_pcm_wav(v) is not None:
            accepted += 1
            check_integrity("wav", v)  # must not raise
            assert plain_wav_block(v).codec == "wav"
        else:
            assert plain_wav_block(v) is None
    assert accepted > len(wavs) * 2
    assert all(probe_pcm_wav(w) is not None for w in wavs)


def test_the_usual_wav_header_reads_as_the_chunk_walk_does(corpora):
    """The one-unpack path for the usual 44-byte header gives what the chunk walk gives for the
    same clip with a chunk before ``fmt `` (which takes the walk), and refuses what it refuses."""
    import struct

    from blocklm.formats.wav import probe_pcm_wav

    for p in sorted((corpora / "audio").rglob("*.wav"))[:10]:
        w = p.read_bytes()
        assert w[12:16] == b"fmt " and w[36:40] == b"data"  # the usual layout
        walked = w[:12] + b"LIST" + struct.pack("<I", 4) + b"abcd" + w[12:]
        assert probe_pcm_wav(w) == probe_pcm_wav(walked) is not None
        for at, value in ((40, 0), (40, 0xFFFFFFFF), (22, 0), (32, 3), (34, 12)):
            bad = bytearray(w)
            struct.pack_into("<I" if at == 40 else "<H", bad, at, value)
            bad_walked = (bytes(bad[:12]) + b"LIST" + struct.pack("<I", 4) + b"abcd"
                          + bytes(bad[12:]))
            assert probe_pcm_wav(bytes(bad)) is None and probe_pcm_wav(bad_walked) is None


def test_plain_pcm16_wavs_decode_as_libsndfile_reads_them(corpora, monkeypatch):
    """decode_block reads a plain 16-bit PCM WAV's samples with numpy (no libsndfile call: its
    Python and virtual-I/O callbacks held the trainer's read-ahead GIL, GPU_NOTES P127): the same
    int16 [frames, channels] array libsndfile reads, writable, for real clips, stereo, a chunk
    before ``fmt ``, a data chunk that ends mid-frame; other WAVs still go to libsndfile."""
    import struct

    import numpy as np
    import soundfile as sf

    from blocklm.formats import Block, codecs
    from blocklm.formats.codecs import decode_block, plain_wav_block

    def wav(x: np.ndarray, subtype: str = "PCM_16") -> bytes:
        buf = io.BytesIO()
        sf.write(buf, x, 8000, format="WAV", subtype=subtype)
        return buf.getvalue()

    rng = np.random.default_rng(0)
    files = [p.read_bytes() for p in sorted((corpora / "audio").rglob("*.wav"))[:10]]
    stereo = wav(rng.integers(-32768, 32767, (301, 2), dtype=np.int16))
    files += [stereo, stereo[:12] + b"LIST" + struct.pack("<I", 4) + b"abcd" + stereo[12:]]
    odd = bytearray(stereo[:-3])  # the data chunk ends a frame and a byte short of its header
    struct.pack_into("<I", odd, 40, len(odd) - 44)
    files.append(bytes(odd))
    calls = []
    real_soundfile = codecs._soundfile
    monkeypatch.setattr(codecs, "_soundfile", lambda: calls.append(1) or real_soundfile())
    for f in files:
        block = plain_wav_block(f)
        assert block is not None and block.meta["subtype"] == "PCM_16"
        got = decode_block(block)
        want, _ = sf.read(io.BytesIO(f), dtype="int16", always_2d=True)
        assert got.dtype == np.int16 and got.flags.writeable
        np.testing.assert_array_equal(got, want)
    assert calls == []  # none of them went to libsndfile
    pcm24 = wav(rng.uniform(-1, 1, (50, 1)), "PCM_24")
    b24 = plain_wav_block(pcm24)
    assert b24.meta["subtype"] == "PCM_24"
    np.testing.assert_array_equal(decode_block(b24),
                                  sf.read(io.BytesIO(pcm24), dtype="float32", always_2d=True)[0])
    # a block whose metadata says PCM_16 over a file that is not: libsndfile, as before
    mislabelled = Block("audio", (50, 1), "wav", pcm24, {"sample_rate": 8000, "subtype": "PCM_16"})
    np.testing.assert_array_equal(decode_block(mislabelled),
                                  sf.read(io.BytesIO(pcm24), dtype="int16", always_2d=True)[0])
    assert len(calls) == 2
