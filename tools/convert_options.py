"""The configuration of a conversion (one dataclass, see DEVELOPERS.md)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

KINDS = ("images", "audio", "text", "jsonl", "manifest", "wds", "hf", "parquet")
TEXT_SPLITS = "lines|paragraphs|chars:N"


@dataclass
class ConvertOptions:
    """How ``blocktool convert`` reads its inputs and writes shards.

    ``kind`` forces every input to one kind (else detected per file, see ``convert_sources``);
    ``text_split`` is ``lines``, ``paragraphs`` or ``chars:N``; ``text_errors`` is ``strict``
    (non-UTF-8 text is rejected) or ``replace``. ``deep_check`` decodes every image and audio
    file even where a structural check covers the format (PNG, JPEG, WAV). ``durable``: every
    shard, index, manifest and journal is ``fsync``ed before its rename (safe against a power
    loss); off, they are left to the page cache (still safe against a killed process).
    """

    kind: str | None = None
    text_split: str = "paragraphs"
    text_errors: str = "strict"
    text_field: str = "text"
    manifest_root: str | None = None  # sample manifest paths: relative to this (default: the
    # manifest's folder) and never outside it
    workers: int | None = None  # None: all cores
    shard_size: int = 256 << 20
    shard_samples: int | None = None
    prefix: str = "shard"
    resume: bool = False
    strict: bool = False
    quiet: bool = False
    deep_check: bool = False
    durable: bool = True

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}: use one of {', '.join(KINDS)}")
        parse_text_split(self.text_split)
        if self.text_errors not in ("strict", "replace"):
            raise ValueError("text_errors must be 'strict' or 'replace'")
        if self.shard_size <= 0:
            raise ValueError("shard_size must be positive")

    @property
    def n_workers(self) -> int:
        return max(1, self.workers if self.workers else (os.cpu_count() or 1))

    def fingerprint_fields(self) -> dict:
        """The options that change the output bytes (a resumed run must use the same)."""
        d = asdict(self)
        for k in ("workers", "resume", "strict", "quiet", "durable"):  # same bytes either way
            d.pop(k)
        if not self.deep_check:  # it may reject more inputs; off, jobs keep their old identity
            d.pop("deep_check")
        if self.manifest_root is not None:
            d["manifest_root"] = os.path.abspath(self.manifest_root)
        return d


def parse_text_split(spec: str) -> tuple[str, int]:
    """``lines`` / ``paragraphs`` / ``chars:N`` -> (how, N)."""
    if spec in ("lines", "paragraphs"):
        return spec, 0
    if spec.startswith("chars:"):
        try:
            n = int(spec[6:])
        except ValueError:
            n = 0
        if n > 0:
            return "chars", n
    raise ValueError(f"bad text split {spec!r}: use {TEXT_SPLITS}")
