"""Structural integrity checks of encoded files (SPEC.md, "Integrity checks").

A file's header alone accepts a truncated or corrupted file. Decoding it catches that, but costs
far more than reading it (PNG inflates at tens of MB/s per core). For the formats whose structure
makes damage visible without decoding, :func:`check_integrity` walks that structure instead:

- ``png``: signature, every chunk's length and CRC-32, ``IHDR`` first, an ``IDAT``, ``IEND``
  present; a cut or a changed byte anywhere up to ``IEND`` breaks a CRC or a length.
- ``jpeg``: ``SOI``, every marker segment's length, scan data up to the next marker, and ``EOI``
  after the scans; a cut file has no ``EOI``. Entropy-coded data carries no checksum, so a changed
  byte inside it is not seen (a decoder mostly decodes such a file anyway, with artefacts).
- ``wav``: RIFF (or RIFX) structure, a ``fmt `` chunk before ``data``, and the ``data`` chunk as
  long as it declares (libsndfile reads a cut file as a shorter clip, so a decode would not notice).

Other codecs (FLAC, whose frame CRCs need the frames decoded, GIF, WebP, BMP, TIFF, OGG, MP3, ...)
have no cheap check here: callers decode them fully (``codecs.decode_block``).
"""

from __future__ import annotations

import re
import struct
import zlib

from .errors import CodecError

try:  # zlib-ng's CRC-32 uses carry-less multiplication: ~25 GB/s here against zlib 1.2.13's ~4
    from zlib_ng.zlib_ng import crc32 as _crc32
except ImportError:  # pragma: no cover - the same values, only slower
    _crc32 = zlib.crc32

INTEGRITY_CODECS = frozenset({"png", "jpeg", "wav"})
"""The codecs :func:`check_integrity` checks; any other codec needs a full decode."""

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
# the next JPEG marker after entropy-coded data: 0xFF not followed by a stuffed 0x00, a restart
# marker RST0-7 (0xD0-0xD7) or another 0xFF (fill bytes before a marker)
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_NO_LENGTH = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: markers without a segment


def check_integrity(codec: str, data: bytes) -> None:
    """Raise :class:`CodecError` (with the reason) if ``data`` is not a structurally complete,
    uncorrupted file of ``codec`` (one of :data:`INTEGRITY_CODECS`).

    Raises ``NotImplementedError`` for any other codec: there is no cheap check for it, and
    passing silently would hide that the file was never checked.
    """
    check = _CHECKS.get(codec)
    if check is None:
        raise NotImplementedError(f"no structural integrity check for codec {codec!r}; "
                                  "decode it fully instead")
    check(data)


def _check_png(data: bytes) -> None:
    if data[:8] != _PNG_SIG:
        raise CodecError("corrupt PNG: bad signature")
    view, n, at = memoryview(data), len(data), 8
    seen_idat = False
    crc32, head = _crc32, _PNG_CHUNK.unpack_from  # locals: ~40 chunks per photo
    while True:
        if at + 12 > n:  # length, type, CRC of the next chunk
            raise CodecError(f"truncated PNG: ends at byte {n} before the IEND chunk")
        length, ctype = head(data, at)
        end = at + 8 + length
        if length > 0x7FFFFFFF or not ctype.isalpha():
            raise CodecError(f"corrupt PNG: bad chunk header at byte {at}")
        if end + 4 > n:
            raise CodecError(f"truncated PNG: chunk {ctype.decode('ascii')} at byte {at} "
                             f"declares {length} bytes, the file ends at byte {n}")
        if crc32(view[at + 4:end]) != _U32.unpack_from(data, end)[0]:
            raise CodecError(f"corrupt PNG: CRC mismatch in chunk {ctype.decode('ascii')} at "
                             f"byte {at}")
        if at == 8 and (ctype != b"IHDR" or length != 13):
            raise CodecError("corrupt PNG: the first chunk is not a 13-byte IHDR")
        if ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            break  # bytes after IEND are ignored, as decoders do
        at = end + 4
    if not seen_idat:
        raise CodecError("corrupt PNG: no IDAT chunk")


_PNG_CHUNK = struct.Struct(">I4s")  # a chunk's length and type
_U32 = struct.Struct(">I")


def _check_jpeg(data: bytes) -> None:
    if data[:2] != b"\xff\xd8":
        raise CodecError("corrupt JPEG: no SOI marker at the start")
    n, at, scans = len(data), 2, 0
    while True:
        if at + 2 > n:
            raise CodecError(f"truncated JPEG: ends at byte {n} before the EOI marker")
        if data[at] != 0xFF:
            raise CodecError(f"corrupt JPEG: expected a marker at byte {at}")
        while at + 2 < n and data[at + 1] == 0xFF:  # fill bytes
            at += 1
        marker = data[at + 1]
        if marker == 0xD9:  # EOI: bytes after it (MPO frames, padding) are ignored, as decoders do
            if scans == 0:
                raise CodecError("corrupt JPEG: EOI before any scan")
            return
        if marker in _JPEG_NO_LENGTH:
            at += 2
            continue
        if marker in (0x00, 0xD8, 0xFF):
            raise CodecError(f"corrupt JPEG: unexpected marker 0xFF{marker:02X} at byte {at}")
        if at + 4 > n:
            raise CodecError(f"truncated JPEG: ends at byte {n} inside a marker segment")
        length = int.from_bytes(data[at + 2:at + 4], "big")
        end = at + 2 + length
        if length < 2:
            raise CodecError(f"corrupt JPEG: segment 0xFF{marker:02X} at byte {at} has length "
                             f"{length}")
        if end > n:
            raise CodecError(f"truncated JPEG: segment 0xFF{marker:02X} at byte {at} declares "
                             f"{length} bytes, the file ends at byte {n}")
        if marker == 0xDA:  # SOS: entropy-coded data runs up to the next real marker
            scans += 1
            m = _JPEG_NEXT_MARKER.search(data, end)
            if m is None:
                raise CodecError(f"truncated JPEG: scan data at byte {end} runs to the end of "
                                 "the file without an EOI marker")
            at = m.start()
        else:
            at = end


def _check_wav(data: bytes) -> None:
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        raise CodecError("corrupt WAV: no RIFF/WAVE header")
    order = "little" if data[:4] == b"RIFF" else "big"
    n, at, seen_fmt = len(data), 12, False
    while True:
        if at + 8 > n:
            raise CodecError(f"truncated WAV: ends at byte {n} before the data chunk")
        cid = data[at:at + 4]
        size = int.from_bytes(data[at + 4:at + 8], order)
        if cid == b"data":
            if not seen_fmt:
                raise CodecError("corrupt WAV: the data chunk comes before the fmt chunk")
            have = n - at - 8
            if size not in (0, 0xFFFFFFFF) and size > have:  # 0 / -1: streamed, size unknown
                raise CodecError(f"truncated WAV: the data chunk declares {size} bytes, the file "
                                 f"holds {have}")
            return  # chunks after the audio data do not affect it
        if at + 8 + size > n:
            name = cid.decode("latin-1")
            raise CodecError(f"truncated WAV: chunk {name!r} at byte {at} declares {size} bytes, "
                             f"the file ends at byte {n}")
        if cid == b"fmt ":
            if size < 14:
                raise CodecError(f"corrupt WAV: fmt chunk of {size} bytes")
            seen_fmt = True
        nxt = at + 8 + size + (size & 1)
        if size & 1 and not _chunk_id_like(data[nxt:nxt + 4]) and \
                _chunk_id_like(data[nxt - 1:nxt + 3]):
            nxt -= 1  # some writers leave out the pad byte after an odd-sized chunk
        at = nxt


def _chunk_id_like(cid: bytes) -> bool:
    return len(cid) == 4 and all(0x20 <= c < 0x7F for c in cid)


_CHECKS = {"png": _check_png, "jpeg": _check_jpeg, "wav": _check_wav}
