"""Splitting an epoch's samples across ranks and DataLoader workers.

Policy (documented in LOADER.md): the epoch's samples are laid out shard by shard in the epoch's
shard order (seeded permutation when shuffling) and numbered ``0..N-1``. Rank ``r`` of ``R`` gets
the contiguous range ``[r*M, (r+1)*M)`` with ``M = N // R``: every rank gets exactly ``M`` samples,
no sample goes to two ranks, and the last ``N % R`` (< R) samples of the epoch's order are left
out of that epoch; which ones changes every epoch when shard order is shuffled. Within a rank,
positions are cut into pieces of ``piece`` consecutive samples dealt round-robin to the workers,
so each worker reads long runs of neighbouring samples (one range read per run).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .shuffle import shard_order


@dataclass
class EpochPlan:
    """Where one rank's samples of one epoch lie."""

    order: np.ndarray  # shard ids in this epoch's order
    cum: np.ndarray  # cumulative sample counts along ``order`` (length len(order) + 1)
    lo: int  # global position of this rank's first sample
    size: int  # samples of this rank (the same for every rank)

    def locate(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(shard ids, sample index within shard)`` of rank-local positions."""
        g = positions + self.lo
        slot = np.searchsorted(self.cum, g, side="right") - 1
        return self.order[slot], g - self.cum[slot]


def plan_epoch(counts: list[int], *, seed: int, epoch: int, shuffle: bool, rank: int,
               world: int) -> EpochPlan:
    """The plan of ``rank`` (of ``world``) for ``epoch`` over shards of ``counts`` samples."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world of size {world}")
    order = shard_order(len(counts), seed, epoch, shuffle)
    c = np.asarray(counts, dtype=np.int64)[order] if len(counts) else np.zeros(0, np.int64)
    cum = np.concatenate([[0], np.cumsum(c)]).astype(np.int64)
    m = int(cum[-1]) // world
    return EpochPlan(order, cum, rank * m, m)


def worker_positions(size: int, done: np.ndarray, workers: int, worker: int,
                     piece: int) -> np.ndarray:
    """The rank-local positions worker ``worker`` of ``workers`` reads, ascending, minus ``done``
    (a boolean mask of positions already consumed)."""
    pos = np.arange(size, dtype=np.int64)
    mine = (pos // max(1, piece)) % workers == worker
    return pos[mine & ~done]


def to_intervals(mask: np.ndarray) -> list[list[int]]:
    """A boolean mask as sorted half-open ``[start, end)`` runs of True."""
    if not mask.any():
        return []
    m = np.concatenate([[False], mask, [False]]).astype(np.int8)
    d = np.diff(m)
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def from_intervals(runs: list[list[int]], size: int) -> np.ndarray:
    """The boolean mask of ``size`` positions covered by ``runs``."""
    mask = np.zeros(size, dtype=bool)
    for a, b in runs:
        if not (0 <= a <= b <= size):
            raise ValueError(f"interval [{a}, {b}) outside 0..{size}")
        mask[a:b] = True
    return mask
