"""Metrics of the dispatcher, accumulated per batch and reported as a plain dict.

Definitions (per mode, over the non-empty batches run so far):

- ``padding_ratio = sum(padded_cost - cost) / sum(padded_cost)``: the fraction of the tokens a
  runner processed that were padding. ``padded_cost`` of a batch is ``n * cost(mode, S)`` with
  ``S`` the elementwise max of its ``n`` shapes; ``cost`` is the sum of the requests' own costs.
  0.0 when no batch ran. (So "padded cost / total cost" of the issue reads "padding cost / total
  processed cost"; 0 means no padding at all.)
- ``batch_fill``: mean of ``padded_cost / budget``.
- ``tokens_per_batch_mean`` / ``tokens_per_batch_var``: mean and population variance of
  ``padded_cost`` (what the runner's memory sees).
- ``queue_age_p50`` / ``queue_age_p99``: nearest-rank percentiles of the requests' age when their
  batch ran (the smallest age ``a`` with at least ``ceil(p/100 * N)`` requests aged ``<= a``), in
  dispatcher steps on the logical clock, in seconds with a wall-clock TTL (1 ms resolution).
- ``ttl_forced``: batches run incomplete because their oldest request outlived the TTL;
  ``ttl_forced_fraction = ttl_forced / batches``; ``reasons`` counts batches by why they ran
  (``full``, ``ttl``, ``stall``, ``drain``; ``empty`` ones are counted apart).
- ``pending``: requests of the mode waiting now.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any


class ModeStats:
    """Accumulators of one mode (plain numbers and counters, so they go into a state_dict)."""

    __slots__ = ("batches", "empty", "requests", "padded", "cost", "padded_sq", "fill",
                 "reasons", "ages")

    def __init__(self) -> None:
        self.batches = 0
        self.empty = 0
        self.requests = 0
        self.padded = 0
        self.cost = 0
        self.padded_sq = 0
        self.fill = 0.0
        self.reasons: Counter[str] = Counter()
        self.ages: Counter[int] = Counter()  # age (steps, or ms) -> number of requests

    def add(self, n: int, padded: int, cost: int, budget: int, reason: str) -> None:
        if n == 0:
            self.empty += 1
            return
        self.batches += 1
        self.requests += n
        self.padded += padded
        self.cost += cost
        self.padded_sq += padded * padded
        self.fill += padded / budget
        self.reasons[reason] += 1

    def report(self, age_scale: float) -> dict[str, Any]:
        b = self.batches
        mean = self.padded / b if b else 0.0
        return {
            "batches": b,
            "empty_batches": self.empty,
            "requests": self.requests,
            "padding_ratio": (self.padded - self.cost) / self.padded if self.padded else 0.0,
            "batch_fill": self.fill / b if b else 0.0,
            "tokens_per_batch_mean": mean,
            "tokens_per_batch_var": self.padded_sq / b - mean * mean if b else 0.0,
            "queue_age_p50": percentile(self.ages, 50) * age_scale,
            "queue_age_p99": percentile(self.ages, 99) * age_scale,
            "ttl_forced": self.reasons["ttl"],
            "ttl_forced_fraction": self.reasons["ttl"] / b if b else 0.0,
            "reasons": dict(sorted(self.reasons.items())),
        }

    def state(self) -> dict[str, Any]:
        return {"batches": self.batches, "empty": self.empty, "requests": self.requests,
                "padded": self.padded, "cost": self.cost, "padded_sq": self.padded_sq,
                "fill": self.fill, "reasons": dict(self.reasons),
                "ages": sorted(self.ages.items())}

    @classmethod
    def from_state(cls, d: dict[str, Any]) -> ModeStats:
        s = cls()
        for k in ("batches", "empty", "requests", "padded", "cost", "padded_sq", "fill"):
            setattr(s, k, d[k])
        s.reasons = Counter(d["reasons"])
        s.ages = Counter({int(a): int(c) for a, c in d["ages"]})
        return s


def percentile(counts: Counter[int], p: float) -> int:
    """Nearest-rank percentile of a histogram ``{value: count}`` (0 when empty)."""
    n = sum(counts.values())
    if n == 0:
        return 0
    rank = max(1, math.ceil(p / 100 * n))
    acc = 0
    for v in sorted(counts):
        acc += counts[v]
        if acc >= rank:
            return v
    return max(counts)


def dispatcher_report(d: Any) -> dict[str, Any]:
    """``Dispatcher.metrics()``: per-rank counters and per-mode :meth:`ModeStats.report`."""
    pending: Counter[str] = Counter()
    for b in d._nonempty:
        pending[b.mode] += len(b.q)
    scale = 1.0 / d._age_unit
    modes = {}
    for m in d.modes:
        modes[m] = d._stats[m].report(scale)
        modes[m]["pending"] = pending[m]
    return {
        "rank": d.rank,
        "clock": d.clock,
        "steps": sum(d.steps_by_mode.values()),
        "empty_steps": d.empty_steps,
        "steps_by_mode": dict(sorted(d.steps_by_mode.items())),
        "examples_in_flight": len(d._in_flight),
        "examples_in_flight_mean": d._in_flight_sum / d.clock if d.clock else 0.0,
        "examples_admitted": d.counts["admitted"],
        "examples_finished": d.counts["finished"],
        "rejected": {k[9:]: v for k, v in sorted(d.counts.items()) if k.startswith("rejected_")},
        "truncated": d.counts["truncated"],
        "modes": modes,
    }
