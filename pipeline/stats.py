"""What a loader did: samples and bytes delivered, retries, and every skip with its reason."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("blocklm.pipeline")

MAX_SKIP_RECORDS = 100  # the most recent skips kept in full; all are counted by reason


@dataclass
class LoaderStats:
    """Counters of one loader (in one process). ``skip_reasons`` maps an error type to a count;
    ``skipped`` keeps the last :data:`MAX_SKIP_RECORDS` skips as ``{shard, key, error}``."""

    samples: int = 0
    bytes: int = 0
    retries: int = 0
    skips: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def skip(self, err: BaseException, shard: str | None, key: str | None) -> None:
        """Count one skipped sample (or one unreadable shard, with ``key`` None) and log it."""
        self.skips += 1
        kind = type(err).__name__
        self.skip_reasons[kind] = self.skip_reasons.get(kind, 0) + 1
        self.skipped.append({"shard": shard, "key": key, "error": f"{kind}: {err}"})
        del self.skipped[:-MAX_SKIP_RECORDS]
        log.warning("skipped %s %s: %s: %s", shard, key, kind, err)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "bytes": self.bytes, "retries": self.retries,
                "skips": self.skips, "skip_reasons": dict(self.skip_reasons),
                "skipped": [dict(s) for s in self.skipped]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderStats:
        return cls(int(d.get("samples", 0)), int(d.get("bytes", 0)), int(d.get("retries", 0)),
                   int(d.get("skips", 0)), dict(d.get("skip_reasons", {})),
                   list(d.get("skipped", [])))

    def add(self, other: LoaderStats) -> LoaderStats:
        """Sum of two stats (e.g. of several workers)."""
        reasons = dict(self.skip_reasons)
        for k, v in other.skip_reasons.items():
            reasons[k] = reasons.get(k, 0) + v
        return LoaderStats(self.samples + other.samples, self.bytes + other.bytes,
                           self.retries + other.retries, self.skips + other.skips, reasons,
                           (self.skipped + other.skipped)[-MAX_SKIP_RECORDS:])
