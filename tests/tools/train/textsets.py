"""Small text datasets written for the trainer's tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from blocklm.formats import Block, Sample, ShardWriter

WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings hum".split()


def phrase(i: int, least: int, spread: int) -> str:
    """Sample ``i``'s text: ``least`` + ``i % spread`` words of :data:`WORDS` from word
    ``i % 7`` on (lengths vary, so buckets and batches do)."""
    return " ".join(WORDS[i % 7:i % 7 + least + i % spread])


def write_samples(out: Path, n: int, blocks: Callable[[int], list[Block]], *,
                  max_samples: int, prefix: str) -> str:
    """``n`` samples ``{prefix}000``, ... with ``blocks(i)``, shards of ``max_samples``."""
    with ShardWriter(out, max_samples=max_samples) as w:
        for i in range(n):
            w.write(Sample(f"{prefix}{i:03d}", blocks(i)))
    return str(out)
