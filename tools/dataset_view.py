"""``blocktool ls`` and ``blocktool cat``: list a dataset's samples from its indexes, and write one
sample's blocks out as ordinary files (``.txt``, the image's or audio's own format)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

from blocklm.formats import FormatError, Sample, ShardReader, iter_index, resolve_dataset
from blocklm.formats.codecs import AUDIO_FILE_CODECS, IMAGE_FILE_CODECS, codec_info

from .dataset_open import opener_for


def ls_lines(path: str, limit: int | None = None) -> Iterator[str]:
    """``KEY<TAB>mode[shape] mode[shape] ...`` for each sample, from the indexes alone."""
    for n, (_, e) in enumerate(iter_index(path, opener=opener_for(path))):
        if limit is not None and n >= limit:
            return
        blocks = " ".join(f"{b.mode}[{'x'.join(map(str, b.shape))}]" for b in e.blocks)
        yield f"{e.key}\t{blocks}"


def find_sample(path: str, key: str) -> Sample:
    """The sample ``key`` of a dataset (indexes locate it; one range read fetches it)."""
    opener = opener_for(path)
    for s in resolve_dataset(path, opener=opener):
        r = ShardReader(s.url, opener=opener, index_xxh3=s.index_xxh3)
        for i, e in enumerate(r.index.samples):
            if e.key == key:
                return r[i]
    raise KeyError(key)


def block_file(block) -> tuple[str, bytes]:
    """(extension, bytes) of a block as an ordinary file."""
    if block.codec == "utf8":
        return "txt", block.payload
    if block.codec in IMAGE_FILE_CODECS or block.codec in AUDIO_FILE_CODECS:
        return codec_info(block.codec).ext, block.payload
    if block.codec == "u8":
        from PIL import Image

        arr = block.decode()
        buf = io.BytesIO()
        Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(buf, "PNG")
        return "png", buf.getvalue()
    if block.codec in ("pcm16", "f32"):
        import soundfile as sf

        buf = io.BytesIO()
        sf.write(buf, block.decode(), int(block.meta.get("sample_rate", 16000)), format="WAV",
                 subtype="PCM_16" if block.codec == "pcm16" else "FLOAT")
        return "wav", buf.getvalue()
    return codec_info(block.codec).ext, block.payload


def write_sample(sample: Sample, out: str | Path) -> list[Path]:
    """Write each block as ``OUT/KEY.I.MODE.EXT`` (``/`` in keys becomes ``__``); the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = sample.key.replace("/", "__")
    paths = []
    for i, b in enumerate(sample.blocks):
        try:
            ext, data = block_file(b)
        except (FormatError, ValueError, OSError) as e:
            raise FormatError(f"cannot write block: {e}", key=sample.key, block=i) from None
        p = out / f"{stem}.{i}.{b.mode}.{ext}"
        p.write_bytes(data)
        paths.append(p)
    return paths
