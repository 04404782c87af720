"""Reading block-list shards with Hugging Face ``datasets`` (its packaged ``webdataset`` builder).

The shards are plain ustar in the WebDataset layout (``KEY.blocks.json``, ``KEY.J.MODE.EXT``), so
``datasets.load_dataset("webdataset", data_files=...)`` reads them with the same keys. Left to
itself, though, the builder infers one set of columns from the first five samples of the first
shard and refuses a dataset whose samples have different member names, which a mixed dataset has
(``KEY.0.audio.wav.zst`` + ``KEY.1.text.txt`` beside ``KEY.0.image.png`` + ``KEY.1.text.txt``;
even one layout yields both ``J.text.txt`` and ``J.text.txt.zst``, since storage compression is
chosen per payload). :func:`hf_features` therefore lists every column from the shard indexes
(no payload is read) for the builder's ``features=``: a sample then has its own members filled
in and ``None`` in the other columns.

>>> import datasets                                                          # doctest: +SKIP
>>> ds = datasets.load_dataset("webdataset", data_files={"train": hf_data_files("data/mixed")},
...                            features=hf_features("data/mixed"), split="train", streaming=True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from blocklm.formats.limits import DEFAULT_LIMITS, Limits
from blocklm.formats.reader import Opener
from blocklm.formats.writer import payload_member

from .opener import RemoteOpener
from .urls import list_shards, load_index_typed

Source = str | os.PathLike | Sequence[str | os.PathLike]


def hf_data_files(source: Source, *, opener: Opener | None = None,
                  limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """The shard paths/URLs of ``source`` (folder, manifest, pattern, list), in order."""
    return [s.url for s in list_shards(source, opener or RemoteOpener(), limits)]


def hf_columns(source: Source, *, opener: Opener | None = None,
               limits: Limits = DEFAULT_LIMITS) -> list[str]:
    """Every member suffix (``blocks.json``, ``0.text.txt``, ``0.text.txt.zst``, ...) that some
    sample of ``source`` has, from the shard indexes, in first-seen order."""
    opener = opener or RemoteOpener()
    seen: dict[str, None] = {"blocks.json": None}
    for shard in list_shards(source, opener, limits):
        idx = load_index_typed(shard.url, opener=opener, limits=limits,
                               expect_xxh3=shard.index_xxh3)
        for e in idx.samples:
            cut = len(e.key) + 1
            for j, b in enumerate(e.blocks):
                seen.setdefault(payload_member(e.key, j, b, b.zstd)[cut:], None)
    return list(seen)


def hf_features(source: Source, *, opener: Opener | None = None, limits: Limits = DEFAULT_LIMITS,
                decode_images: bool = True, audio: bool | None = None) -> Any:
    """``datasets.Features`` for ``load_dataset("webdataset", ..., features=...)`` covering every
    column of ``source``: ``blocks.json`` as ``Json`` (the sample header, parsed), images as
    ``Image``, ``.txt`` as strings (the builder decodes them, after undoing ``.zst``), audio as
    ``Audio`` when ``audio`` (default: when ``torchcodec``, which ``datasets`` needs for any
    ``Audio`` column, is installed) else as bytes like everything else; plus the builder's
    ``__key__`` and ``__url__``."""
    import importlib.util

    import datasets
    from datasets.packaged_modules.webdataset.webdataset import WebDataset as Builder

    if audio is None:
        audio = importlib.util.find_spec("torchcodec") is not None

    feats: dict[str, Any] = {}
    for col in hf_columns(source, opener=opener, limits=limits):
        ext = col[:-4] if col.endswith(".zst") else col
        ext = ext.rsplit(".", 1)[-1].lower()
        if col == "blocks.json":
            feats[col] = datasets.Json()
        elif ext in Builder.IMAGE_EXTENSIONS:
            feats[col] = datasets.Image(decode=decode_images)
        elif audio and ext in Builder.AUDIO_EXTENSIONS:
            feats[col] = datasets.Audio()
        elif ext in ("txt", "text", "transcript"):
            feats[col] = datasets.Value("string")
        else:
            feats[col] = datasets.Value("binary")
    feats["__key__"] = datasets.Value("string")
    feats["__url__"] = datasets.Value("string")
    return datasets.Features(feats)
