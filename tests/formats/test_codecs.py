"""Codecs: exact payload bytes, real-file round trips, channel and bit-depth policy."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from blocklm.formats import (
    CodecError,
    Sample,
    ShardWriter,
    audio_file_block,
    bytes_block,
    image_file_block,
    iter_dataset,
    pcm_block,
    raw_image_block,
    text_block,
    tokens_block,
)


def test_utf8_exact_bytes():
    b = text_block("héllo")
    assert (b.codec, b.shape, b.payload) == ("utf8", (5,), "héllo".encode())
    assert b.decode() == "héllo"


def test_tokens_exact_bytes():
    b = tokens_block([1, 258, 65535])
    assert (b.codec, b.shape, b.payload) == ("tok16", (3,), b"\x01\x00\x02\x01\xff\xff")
    b32 = tokens_block([65536, 1])
    assert (b32.codec, b32.payload) == ("tok32", b"\x00\x00\x01\x00\x01\x00\x00\x00")
    assert b32.decode().tolist() == [65536, 1]


def test_raw_image_and_pcm_exact_bytes():
    px = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    b = raw_image_block(px)
    assert (b.codec, b.shape, b.payload) == ("u8", (2, 2, 3), bytes(range(12)))
    assert np.array_equal(b.decode(), px)
    pcm = np.array([[1, -2], [3, -32768]], dtype=np.int16)
    p = pcm_block(pcm, 16000)
    assert (p.codec, p.shape, p.meta) == ("pcm16", (2, 2), {"sample_rate": 16000})
    assert p.payload == b"\x01\x00\xfe\xff\x03\x00\x00\x80"
    f = pcm_block(np.array([0.5, -1.0], dtype=np.float32), 8000)
    assert (f.codec, f.shape, f.payload) == ("f32", (2, 1), b"\x00\x00\x00?\x00\x00\x80\xbf")


def test_opaque_block_round_trips_unchanged():
    b = bytes_block("midi", (3, 4), b"\x00\x01weird", codec="smf", meta={"ticks": 96})
    assert b.decode() == b"\x00\x01weird"


def test_shape_mismatch_is_a_codec_error():
    from blocklm.formats import Block
    with pytest.raises(CodecError, match="declared shape"):
        Block("text", (3,), "utf8", b"ab").decode()
    with pytest.raises(CodecError, match="declared shape"):
        Block("text", (3,), "tok16", b"\x00\x00").decode()
    with pytest.raises(CodecError, match="not valid UTF-8"):
        Block("text", (1,), "utf8", b"\xff").decode()


def _png(mode: str, size=(5, 3), **save) -> bytes:
    img = Image.new(mode, size)
    buf = io.BytesIO()
    img.save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("mode,channels,dtype", [
    ("L", 1, "uint8"), ("LA", 2, "uint8"), ("RGB", 3, "uint8"), ("RGBA", 4, "uint8"),
    ("P", 3, "uint8"), ("I;16", 1, "uint16"), ("1", 1, "uint8"),
])
def test_image_channels_kept(mode, channels, dtype):
    data = _png(mode)
    b = image_file_block(data)
    assert b.payload == data and b.shape == (3, 5, channels) and b.meta["dtype"] == dtype
    arr = b.decode()
    assert arr.shape == (3, 5, channels) and str(arr.dtype) == dtype


def test_palette_with_transparency_has_alpha():
    img = Image.new("P", (4, 4))
    img.info["transparency"] = 0
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)
    b = image_file_block(buf.getvalue())
    assert b.shape == (4, 4, 4) and b.decode().shape == (4, 4, 4)


def test_multiframe_gif_policy_first_frame():
    frames = [Image.new("RGB", (6, 4), color=(80 * i, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    b = image_file_block(buf.getvalue())
    assert b.codec == "gif" and b.meta["frames"] == 3 and b.decode().shape == (4, 6, 3)
    # the decoder reuses the image its header probe opened, which counted the frames by
    # seeking through them: it must still decode the first frame, not the last
    first = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    assert np.array_equal(b.decode(), first) and b.decode()[0, 0, 0] == 0


def test_not_an_image_or_audio():
    with pytest.raises(CodecError, match="not a readable image"):
        image_file_block(b"definitely not a png")
    with pytest.raises(CodecError, match="not a readable audio"):
        audio_file_block(b"RIFF....garbage")


def test_truncated_png_fails_on_decode():
    data = _png("RGB", size=(64, 64))
    noisy = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8))
    buf = io.BytesIO()
    noisy.save(buf, format="PNG")
    data = buf.getvalue()
    b = image_file_block(data[: len(data) // 2])  # the header alone still reads
    with pytest.raises(CodecError, match="does not decode"):
        b.decode()


def test_real_png_and_wav_keep_their_bytes(corpora, tmp_path):
    pngs = sorted((corpora / "images" / "bsd100").glob("*.png"))[:2]
    pngs += sorted((corpora / "images" / "set14").glob("*.png"))[:3]
    wavs = sorted((corpora / "audio" / "fsdd").glob("*.wav"))[:3]
    samples = [Sample(f"img{i}", [image_file_block(p.read_bytes())]) for i, p in enumerate(pngs)]
    samples += [Sample(f"wav{i}", [audio_file_block(p.read_bytes())]) for i, p in enumerate(wavs)]
    with ShardWriter(tmp_path) as w:
        for s in samples:
            w.write(s)
    back = list(iter_dataset(tmp_path))
    for s, path in zip(back, pngs + wavs):
        blk = s.blocks[0]
        assert blk.payload == path.read_bytes()
        content = blk.decode()
        assert content.shape == blk.shape
    img = back[0].blocks[0]
    assert img.shape in ((480, 320, 3), (320, 480, 3))
    ref = np.asarray(Image.open(pngs[0]).convert("RGB"))
    assert np.array_equal(img.decode(), ref)
    wav = back[len(pngs)].blocks[0]
    assert wav.codec == "wav" and wav.meta["sample_rate"] == 8000 and wav.shape[1] == 1
    # WAV is compressed in the shard, PNG stored as it is
    stored = {e.blocks[0].codec: e.blocks[0].zstd for _, e in
              __import__("blocklm.formats", fromlist=["iter_index"]).iter_index(tmp_path)}
    assert stored == {"png": False, "wav": True}


def test_truncated_wav_is_rejected_not_shortened(corpora):
    data = sorted((corpora / "audio" / "fsdd").glob("*.wav"))[0].read_bytes()
    with pytest.raises(CodecError, match="truncated WAV"):
        audio_file_block(data[: len(data) // 2])


def test_audio_errors_do_not_carry_memory_addresses():
    with pytest.raises(CodecError) as e:
        audio_file_block(b"RIFF....garbage")
    assert " at 0x" not in str(e.value)


def test_write_encoded_matches_write(tmp_path):
    from blocklm.formats.writer import SampleEncoder
    samples = [Sample(f"e{i}", [text_block("x" * i)]) for i in range(5)]
    with ShardWriter(tmp_path / "a", max_samples=2) as w:
        for s in samples:
            w.write(s)
    enc = SampleEncoder()
    with ShardWriter(tmp_path / "b", max_samples=2) as w:
        for s in samples:
            w.write_encoded(*enc.encode(s))
    for f in sorted((tmp_path / "a").iterdir()):
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes()
