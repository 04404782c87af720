"""Size limits checked before anything read from a shard is allocated (SPEC.md, "Limits")."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .errors import LimitError


@dataclass(frozen=True)
class Limits:
    """Caps on untrusted sizes. Defaults fit large real data and stop absurd declarations."""

    max_payload_bytes: int = 1 << 30  # stored or decoded payload of one block: 1 GiB
    max_elements: int = 1 << 31  # product of a block's shape
    max_ndim: int = 8
    max_blocks: int = 4096  # blocks per sample
    max_header_bytes: int = 1 << 20  # a sample's .blocks.json member
    max_meta_bytes: int = 4096  # a block's metadata, as canonical JSON
    max_index_bytes: int = 1 << 30  # one shard's index file

    def check_shape(self, shape: tuple[int, ...], **where) -> None:
        """Raise :class:`LimitError` unless ``shape`` is small enough to allocate."""
        if len(shape) > self.max_ndim:
            raise LimitError(f"shape {list(shape)} has {len(shape)} dims > {self.max_ndim}", **where)
        n = math.prod(shape)
        if n > self.max_elements:
            raise LimitError(
                f"shape {list(shape)} declares {n} elements > limit {self.max_elements}", **where
            )

    def check_bytes(self, n: int, what: str, cap: int | None = None, **where) -> None:
        """Raise :class:`LimitError` if ``n`` bytes of ``what`` exceed ``cap`` (default payload cap)."""
        cap = self.max_payload_bytes if cap is None else cap
        if n < 0 or n > cap:
            raise LimitError(f"{what} of {n} bytes exceeds limit {cap}", **where)


DEFAULT_LIMITS = Limits()
