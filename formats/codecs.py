"""Payload codecs (SPEC.md, "Codecs"): build blocks from content and decode them back.

A codec names how a block's payload bytes encode its content. Encoded files (PNG, WAV, ...) are
kept byte-for-byte; their shape is read from the file's header, never by guessing. Decoding checks
that the content agrees with the declared shape and caps sizes before it allocates.
"""

from __future__ import annotations

import importlib
import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from .block import MODE_RE, Block, MetaValue
from .errors import CodecError, CodecUnavailableError
from .limits import DEFAULT_LIMITS, Limits
from .wav import check_wav_complete, pcm16_samples, probe_pcm_wav


@dataclass(frozen=True)
class CodecInfo:
    """What the format knows of a codec: the member file extension and the storage policy."""

    ext: str
    zstd: bool  # the writer compresses this codec's payloads (kept only when it shrinks them)


CODECS: dict[str, CodecInfo] = {
    # text
    "utf8": CodecInfo("txt", True),
    "tok16": CodecInfo("tok16", True),
    "tok32": CodecInfo("tok32", True),
    # images: encoded files, and raw uint8 arrays
    "png": CodecInfo("png", False),
    "jpeg": CodecInfo("jpg", False),
    "webp": CodecInfo("webp", False),
    "gif": CodecInfo("gif", False),
    "bmp": CodecInfo("bmp", True),
    "tiff": CodecInfo("tif", True),
    "u8": CodecInfo("u8", True),
    # audio: encoded files, and raw PCM
    "wav": CodecInfo("wav", True),
    "flac": CodecInfo("flac", False),
    "ogg": CodecInfo("ogg", False),
    "opus": CodecInfo("opus", False),
    "mp3": CodecInfo("mp3", False),
    "sph": CodecInfo("sph", True),
    "pcm16": CodecInfo("pcm16", True),
    "f32": CodecInfo("f32", True),
    # anything else
    "bytes": CodecInfo("bin", True),
}
UNKNOWN_CODEC = CodecInfo("bin", False)

IMAGE_FILE_CODECS = {"png", "jpeg", "webp", "gif", "bmp", "tiff"}
AUDIO_FILE_CODECS = {"wav", "flac", "ogg", "opus", "mp3", "sph"}
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "WEBP": "webp", "GIF": "gif",
                "BMP": "bmp", "TIFF": "tiff"}
_SF_FORMATS = {"WAV": "wav", "WAVEX": "wav", "FLAC": "flac", "MP3": "mp3", "NIST": "sph"}
_OBJ_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-f]+>")  # error texts stay the same every run
_ARRAY_DTYPES = {"tok16": "<u2", "tok32": "<u4", "u8": "u1", "pcm16": "<i2", "f32": "<f4"}


def _library(name: str, needs: str) -> Any:
    """Module ``name``; :class:`CodecUnavailableError` saying what ``needs`` it when it cannot be
    loaded (an import raises ImportError without, say, soundfile's ``cffi`` backend, OSError
    without libsndfile)."""
    try:
        return importlib.import_module(name)
    except (ImportError, OSError) as e:
        raise CodecUnavailableError(f"{needs}, which cannot be loaded here "
                                    f"({type(e).__name__}: {e})") from e


def _soundfile() -> Any:
    return _library("soundfile", "audio blocks need the 'soundfile' package and libsndfile "
                                 "(pip install soundfile)")


def _pil_image() -> Any:
    return _library("PIL.Image", "image blocks need Pillow (pip install pillow)")


def codec_info(codec: str) -> CodecInfo:
    """The codec's table entry; unknown codecs are opaque (stored as-is, decoded to bytes)."""
    return CODECS.get(codec, UNKNOWN_CODEC)


# ----------------------------------------------------------------------------- constructors

def text_block(text: str, mode: str = "text", meta: dict[str, MetaValue] | None = None) -> Block:
    """A UTF-8 text block of shape ``[n_chars]`` (Unicode code points)."""
    return Block(mode, (len(text),), "utf8", text.encode("utf-8"), dict(meta or {}))


def tokens_block(ids: Any, mode: str = "text", meta: dict[str, MetaValue] | None = None) -> Block:
    """Token ids as little-endian uint16 (``tok16``) or, if any id needs it, uint32 (``tok32``)."""
    arr = np.asarray(ids).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise CodecError("token ids must be in [0, 2**32)")
    codec = "tok16" if (arr.size == 0 or arr.max() < 2**16) else "tok32"
    data = arr.astype(_ARRAY_DTYPES[codec]).tobytes()
    return Block(mode, (int(arr.size),), codec, data, dict(meta or {}))


def raw_image_block(pixels: np.ndarray, mode: str = "image",
                    meta: dict[str, MetaValue] | None = None) -> Block:
    """A raw uint8 ``[H, W, C]`` image (``u8``)."""
    arr = np.asarray(pixels)
    if arr.dtype != np.uint8 or arr.ndim != 3:
        raise CodecError(f"raw image must be uint8 [H, W, C], got {arr.dtype} {list(arr.shape)}")
    return Block(mode, tuple(int(d) for d in arr.shape), "u8", np.ascontiguousarray(arr).tobytes(),
                 dict(meta or {}))


def pcm_block(samples: np.ndarray, sample_rate: int, mode: str = "audio",
              meta: dict[str, MetaValue] | None = None) -> Block:
    """Raw PCM ``[frames, channels]``: int16 (``pcm16``) or float32 (``f32``) little-endian."""
    arr = np.asarray(samples)
    if arr.ndim == 1:
        arr = arr[:, None]
    codec = {np.dtype(np.int16): "pcm16", np.dtype(np.float32): "f32"}.get(arr.dtype)
    if codec is None or arr.ndim != 2:
        raise CodecError(f"PCM must be int16 or float32 [frames, channels], got {arr.dtype} "
                         f"{list(arr.shape)}")
    m = dict(meta or {})
    m["sample_rate"] = int(sample_rate)
    data = np.ascontiguousarray(arr).astype(_ARRAY_DTYPES[codec]).tobytes()
    return Block(mode, tuple(int(d) for d in arr.shape), codec, data, m)


def bytes_block(mode: str, shape: tuple[int, ...], data: bytes, codec: str = "bytes",
                meta: dict[str, MetaValue] | None = None) -> Block:
    """An opaque block: the bytes round-trip unchanged with the declared shape."""
    return Block(mode, tuple(shape), codec, bytes(data), dict(meta or {}))


def image_file_block(data: bytes, mode: str = "image", meta: dict[str, MetaValue] | None = None,
                     limits: Limits = DEFAULT_LIMITS) -> Block:
    """An encoded image kept byte-for-byte; shape ``[H, W, C]`` and bit depth from its header."""
    codec, shape, probed = probe_image(data, limits)
    return _file_block(mode, shape, codec, data, probed, meta)


def audio_file_block(data: bytes, mode: str = "audio", meta: dict[str, MetaValue] | None = None,
                     limits: Limits = DEFAULT_LIMITS) -> Block:
    """An encoded audio file kept byte-for-byte; shape ``[frames, channels]``, ``sample_rate``."""
    codec, shape, probed = probe_audio(data, limits)
    return _file_block(mode, shape, codec, data, probed, meta)


def _file_block(mode: str, shape: tuple[int, ...], codec: str, data: bytes,
                probed: dict[str, MetaValue], meta: dict[str, MetaValue] | None) -> Block:
    """The block of a probed file. With no caller metadata every field but the mode comes from
    the probes (known names, scalar values, non-negative ints), so only the mode is checked
    here; caller metadata goes through the full validation of ``Block``."""
    if meta or not isinstance(mode, str) or not MODE_RE.match(mode):
        m = dict(probed)
        m.update(meta or {})
        return Block(mode, shape, codec, bytes(data), m)
    return Block.trusted(mode, tuple(shape), codec, bytes(data), dict(probed))


# ----------------------------------------------------------------------------- probing

def _image_channels(img) -> tuple[int, str]:
    """Channels and numpy dtype that :func:`decode_block` returns for a PIL image."""
    mode = img.mode
    if mode == "P":
        return (4 if "transparency" in img.info else 3), "uint8"
    if mode == "PA":
        return 4, "uint8"
    if mode in ("1", "L"):
        return 1, "uint8"
    if mode == "LA":
        return 2, "uint8"
    if mode.startswith("I;16"):
        return 1, "uint16"
    if mode in ("I", "F"):
        return 1, "int32" if mode == "I" else "float32"
    if mode in ("RGBA", "RGBa", "CMYK"):
        return 4, "uint8"
    return 3, "uint8"  # RGB, YCbCr, LAB, HSV decode to three channels


def _png_bit_depth(data: bytes) -> int | None:
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 25 and data[12:16] == b"IHDR":
        return data[24]
    return None


def probe_image(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, tuple[int, int, int],
                                                                      dict[str, MetaValue]]:
    """Read an encoded image's codec, ``(H, W, C)`` and metadata from its header (no decode)."""
    return _open_image(data, limits)[1:]


def _open_image(data: bytes, limits: Limits) -> tuple[Any, str, tuple[int, int, int],
                                                       dict[str, MetaValue]]:
    """:func:`probe_image`'s answer after the opened (not yet decoded) PIL image."""
    Image = _pil_image()
    try:
        img = Image.open(io.BytesIO(data))
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CodecError(f"not a readable image: {e}") from None
    codec = _PIL_FORMATS.get(img.format or "")
    if codec is None:
        raise CodecError(f"unsupported image format {img.format!r}")
    w, h = img.size
    c, dtype = _image_channels(img)
    limits.check_shape((h, w, c))
    meta: dict[str, MetaValue] = {"pil_mode": img.mode, "dtype": dtype}
    depth = _png_bit_depth(data)
    if depth is not None:
        meta["bit_depth"] = int(depth)
    frames = int(getattr(img, "n_frames", 1) or 1)
    if frames > 1:
        meta["frames"] = frames  # policy (SPEC.md): the block is the first frame
    return img, codec, (h, w, c), meta


def probe_audio(data: bytes, limits: Limits = DEFAULT_LIMITS) -> tuple[str, tuple[int, int],
                                                                      dict[str, MetaValue]]:
    """Read an encoded audio file's codec, ``(frames, channels)`` and sample rate from its header."""
    fast = probe_pcm_wav(data)
    if fast is not None:
        limits.check_shape(fast[0])
        return "wav", fast[0], fast[1]
    sf = _soundfile()
    try:
        info = sf.info(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise CodecError(f"not a readable audio file: {_OBJ_REPR.sub('<bytes>', str(e))}") \
            from None
    codec = _SF_FORMATS.get(info.format)
    if info.format == "OGG":
        codec = "opus" if info.subtype == "OPUS" else "ogg"
    if codec is None:
        raise CodecError(f"unsupported audio format {info.format!r}")
    if codec == "wav":
        check_wav_complete(data)
    shape = (int(info.frames), int(info.channels))
    limits.check_shape(shape)
    meta: dict[str, MetaValue] = {"sample_rate": int(info.samplerate), "subtype": info.subtype}
    return codec, shape, meta


def plain_wav_block(data: bytes, mode: str = "audio",
                    limits: Limits = DEFAULT_LIMITS) -> Block | None:
    """:func:`audio_file_block` of a plain WAV (see :func:`.wav.probe_pcm_wav`), else None. Such a file
    needs no ``check_integrity`` walk of its chunks: the probe has walked them by stricter
    rules (a converter's ~1 us a clip)."""
    fast = probe_pcm_wav(data)
    if fast is None:
        return None
    limits.check_shape(fast[0])
    return _file_block(mode, fast[0], "wav", data, fast[1], None)


# ----------------------------------------------------------------------------- decoding

def decode_block(block: Block, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode a block's payload into content and check it against the declared shape.

    Returns ``str`` (utf8), a numpy array (token ids ``[n]``, images ``[H, W, C]``, audio
    ``[frames, channels]``) or ``bytes`` (``bytes`` and unknown codecs).
    """
    codec, shape = block.codec, block.shape
    limits.check_shape(shape)
    if codec == "utf8":
        try:
            text = block.payload.decode("utf-8")
        except UnicodeDecodeError as e:
            raise CodecError(f"utf8 payload is not valid UTF-8: {e}") from None
        _expect(len(shape) == 1 and len(text) == shape[0], block, f"{len(text)} characters")
        return text
    if codec in _ARRAY_DTYPES:
        dt = np.dtype(_ARRAY_DTYPES[codec])
        n = math.prod(shape)
        _expect(len(block.payload) == n * dt.itemsize, block, f"{len(block.payload)} bytes")
        return np.frombuffer(block.payload, dtype=dt).reshape(shape)
    if codec in IMAGE_FILE_CODECS:
        return _decode_image(block, limits)
    if codec in AUDIO_FILE_CODECS:
        return _decode_audio(block)
    return block.payload


def _expect(ok: bool, block: Block, got: str) -> None:
    if not ok:
        raise CodecError(f"{block.codec} payload does not match declared shape "
                         f"{list(block.shape)}: got {got}")


def _decode_image(block: Block, limits: Limits) -> np.ndarray:
    img, _, shape, _ = _open_image(block.payload, limits)  # opened once (header read)
    _expect(shape == block.shape, block, f"{list(shape)} in the file header")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError) as e:
        raise CodecError(f"image does not decode: {e}") from None
    if img.mode == "P" or img.mode == "PA":
        img = img.convert("RGBA" if shape[2] == 4 else "RGB")
    elif img.mode == "1":
        img = img.convert("L")
    elif img.mode in ("YCbCr", "LAB", "HSV"):
        img = img.convert("RGB")
    elif img.mode == "CMYK":
        img = img.convert("RGBA")
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    _expect(arr.shape == block.shape, block, f"{list(arr.shape)} decoded")
    return arr


def _decode_audio(block: Block) -> np.ndarray:
    dtype = "int16" if block.meta.get("subtype") == "PCM_16" else "float32"
    if dtype == "int16" and block.codec == "wav":
        arr = pcm16_samples(block.payload)
        if arr is not None:
            _expect(arr.shape == block.shape, block, f"{list(arr.shape)} decoded")
            return arr
    sf = _soundfile()
    try:
        arr, _ = sf.read(io.BytesIO(block.payload), dtype=dtype, always_2d=True)
    except (sf.LibsndfileError, RuntimeError, ValueError) as e:
        raise CodecError(f"audio does not decode: {e}") from None
    _expect(arr.shape == block.shape, block, f"{list(arr.shape)} decoded")
    return arr
