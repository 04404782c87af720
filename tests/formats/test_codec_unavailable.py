"""A decoder library that cannot be loaded is the environment's fault, not the data's: decoding
raises :class:`CodecUnavailableError` naming the package (seen on a machine whose ``soundfile``
lacked its ``cffi`` backend: every audio block was rejected as bad data, each after a failed
import)."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from blocklm.formats import (
    CodecError,
    CodecUnavailableError,
    audio_file_block,
    decode_block,
    image_file_block,
)


def _wav(subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.zeros((40, 1), dtype=np.int16), 8000, format="WAV", subtype=subtype)
    return buf.getvalue()


def _png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_audio_decode_without_soundfile_names_the_package(monkeypatch):
    block = audio_file_block(_wav("PCM_24"))  # a plain WAV is probed without soundfile
    monkeypatch.setitem(sys.modules, "soundfile", None)  # its import now raises ImportError
    with pytest.raises(CodecUnavailableError, match="soundfile"):
        decode_block(block)
    # a plain 16-bit PCM WAV's samples are read with numpy: no soundfile needed
    assert decode_block(audio_file_block(_wav())).shape == (40, 1)


def test_image_decode_without_pillow_names_the_package(monkeypatch):
    block = image_file_block(_png())
    monkeypatch.setitem(sys.modules, "PIL", None)  # Pillow not installed: no module of it
    monkeypatch.setitem(sys.modules, "PIL.Image", None)
    with pytest.raises(CodecUnavailableError, match="Pillow"):
        decode_block(block)


def test_unavailable_is_not_a_codec_error():
    # callers that reject bad data (CodecError, FormatError, ValueError) must not catch it
    assert not issubclass(CodecUnavailableError, (CodecError, ValueError))
    assert issubclass(CodecUnavailableError, ImportError)


def test_bad_audio_is_still_a_codec_error():
    block = audio_file_block(_wav())
    block.payload = block.payload[:30]  # cut inside the header: the data's fault
    with pytest.raises(CodecError):
        decode_block(block)
