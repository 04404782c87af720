"""Plain WAV files read from their chunks, without libsndfile (SPEC.md, "Codecs": ``wav``).

The converter probes a clip's shape and metadata here (``probe_pcm_wav``), the decoder reads a
plain 16-bit PCM clip's samples here (``pcm16_samples``), and ``check_wav_complete`` rejects a
file whose data chunk is cut short (libsndfile would read it as a shorter clip). Anything less
plain returns None from the readers: libsndfile (``formats/codecs.py``) reads it instead.
"""

from __future__ import annotations

import struct

import numpy as np

from .block import MetaValue
from .errors import CodecError

_WAV_SUBTYPES = {(1, 8): "PCM_U8", (1, 16): "PCM_16", (1, 24): "PCM_24", (1, 32): "PCM_32",
                 (3, 32): "FLOAT", (3, 64): "DOUBLE"}


def probe_pcm_wav(data: bytes) -> tuple[tuple[int, int], dict[str, MetaValue]] | None:
    """Shape and metadata of a plain little-endian PCM or float WAV read from its chunks, as
    libsndfile reports them (frames = data bytes // block size), without libsndfile's virtual-I/O
    round trips (~50 us a file). Anything less plain (RIFX, WAVE_FORMAT_EXTENSIBLE, other codecs,
    odd-sized chunks, a streamed or cut data chunk) returns None: libsndfile reads it instead.
    A file it accepts passes ``check_integrity("wav")`` too (every chunk before ``data`` whole,
    ``fmt `` first, ``data`` as long as it declares: tests/formats/test_encoder_checks.py)."""
    plain = plain_wav(data)
    return None if plain is None else plain[:2]


def plain_wav(data: bytes) -> tuple[tuple[int, int], dict[str, MetaValue], int] | None:
    """:func:`probe_pcm_wav`'s answer and where the samples start (the data chunk's body)."""
    n = len(data)
    if n < 44:
        return None
    riff, _, wave, fid, fsize, *fmt, did, dsize = _CANONICAL.unpack_from(data)
    if riff != b"RIFF" or wave != b"WAVE":
        return None
    if fid == b"fmt " and fsize == 16 and did == b"data":  # the usual 44-byte header: one unpack
        return _pcm_shape(fmt, dsize, n - 44, 44)
    at, fmt, chunk = 12, None, _CHUNK.unpack_from
    while at + 8 <= n:
        cid, size = chunk(data, at)
        if cid == b"data":
            return None if fmt is None else _pcm_shape(fmt, size, n - at - 8, at + 8)
        if size & 1 or at + 8 + size > n:
            return None
        if cid == b"fmt ":
            if fmt is not None or size < 16:
                return None
            fmt = _FMT.unpack_from(data, at + 8)
        at += 8 + size
    return None


def _pcm_shape(fmt, size: int, have: int,
               start: int) -> tuple[tuple[int, int], dict[str, MetaValue], int] | None:
    """``plain_wav``'s answer for a ``data`` chunk of ``size`` bytes (``have`` in the file)
    whose samples begin at ``start``."""
    if size == 0 or size > have:
        return None
    tag, channels, rate, _, align, bits = fmt
    subtype = _WAV_SUBTYPES.get((tag, bits))
    if subtype is None or not 1 <= channels <= 256 or rate <= 0 or align != channels * bits // 8:
        return None
    return (size // align, channels), {"sample_rate": rate, "subtype": subtype}, start


# RIFF, size, WAVE, "fmt ", 16, the 16-byte fmt body, "data", size: the usual 44-byte header
_CANONICAL = struct.Struct("<4sI4s4sIHHIIHH4sI")
_CHUNK = struct.Struct("<4sI")  # a RIFF chunk's id and size
_FMT = struct.Struct("<HHIIHH")  # format tag, channels, rate, byte rate, block align, bits


def pcm16_samples(data: bytes) -> np.ndarray | None:
    """A plain 16-bit PCM WAV's samples, int16 [frames, channels], read from its data chunk
    with numpy: the same array libsndfile reads (the file's little-endian samples as they are),
    without its ~100 us of Python and virtual-I/O callbacks a clip, which held the GIL in the
    trainer's read-ahead thread (GPU_NOTES P127). None for anything else: libsndfile reads it."""
    plain = plain_wav(data)
    if plain is None or plain[1]["subtype"] != "PCM_16":
        return None
    (frames, channels), _, start = plain
    n = frames * channels
    return np.frombuffer(data, dtype="<i2", count=n, offset=start).reshape(frames, channels).copy()


def check_wav_complete(data: bytes) -> None:
    """Reject a RIFF/WAVE file whose data chunk is cut short. libsndfile reads such a file as a
    shorter clip without complaint, so neither its header nor a decode would notice."""
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return
    at = 12
    while at + 8 <= len(data):
        cid, size = data[at:at + 4], int.from_bytes(data[at + 4:at + 8], "little")
        if cid == b"data":
            have = len(data) - at - 8
            if size not in (0, 0xFFFFFFFF) and size > have:  # 0 / -1: streamed, size unknown
                raise CodecError(f"truncated WAV: the data chunk declares {size} bytes, the "
                                 f"file holds {have}")
            return
        at += 8 + size + (size & 1)
