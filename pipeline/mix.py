"""A weighted mixture of datasets, deterministic under the seed and exactly resumable.

Each draw picks a source with probability proportional to its weight among the sources still
running, from a generator seeded by ``(seed, epoch, workers, worker)``: not by rank, so every rank
draws the same sequence and, its sources having equal counts per rank, yields the same number of
samples. ``stop="first"`` ends the pass when a drawn source is exhausted (proportions hold to the
end, nothing is repeated); ``stop="all"`` drops exhausted sources and goes on until all are done.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

from torch.utils.data import IterableDataset, get_worker_info

from .state import MIX_KEY, STATE_VERSION, check_same, extract_states
from .stats import LoaderStats


class MixedDataset(IterableDataset):
    """Samples of ``datasets`` interleaved by ``weights`` (see the module docstring)."""

    def __init__(self, datasets: Sequence[Any], weights: Sequence[float], *, seed: int = 0,
                 stop: str = "first") -> None:
        super().__init__()
        if len(datasets) != len(weights) or not datasets:
            raise ValueError("give one weight per dataset, at least one dataset")
        if any(not (w >= 0) for w in weights) or sum(weights) <= 0:
            raise ValueError(f"weights must be >= 0 with a positive sum, got {list(weights)}")
        if stop not in ("first", "all"):
            raise ValueError(f"stop must be 'first' or 'all', not {stop!r}")
        self.datasets = list(datasets)
        self.weights = [float(w) for w in weights]
        self.seed, self.stop = int(seed), stop
        self.epoch = 0
        self._pending: list[dict[str, Any]] | None = None
        self._pass: dict[str, Any] | None = None

    @property
    def stats(self) -> LoaderStats:
        """The sum of the sources' stats."""
        total = LoaderStats()
        for d in self.datasets:
            total = total.add(d.stats)
        return total

    def set_epoch(self, epoch: int) -> None:
        if self._pending and self._pending[0]["epoch"] != epoch:
            self._pending = None
        if epoch != self.epoch:
            self._pass = None
        self.epoch = int(epoch)
        for d in self.datasets:
            d.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        st: dict[str, Any] = {MIX_KEY: STATE_VERSION, "epoch": self.epoch, "seed": self.seed,
                              "weights": self.weights,
                              "children": [d.state_dict() for d in self.datasets]}
        p = self._pass or (self._pending[0] if self._pending and len(self._pending) == 1
                           else None)
        if p is not None:
            st.update(workers=p.get("workers"), worker=p.get("worker"),
                      draws=p.get("draws", 0), alive=list(p.get("alive", [])),
                      gen=p.get("gen", 0))
        else:
            st.update(workers=None, worker=None, draws=0, alive=[], gen=0)
        return st

    def load_indexes(self) -> int:
        """Each dataset's :meth:`BlockDataset.load_indexes`; how many in all."""
        return sum(d.load_indexes() for d in self.datasets)

    def load_state_dict(self, state: Any) -> None:
        """Resume from a mixture state, a list of them, or a ``StatefulDataLoader`` state."""
        states = extract_states(state, MIX_KEY)
        if not states:
            return
        check_same(states + [{"seed": self.seed, "weights": self.weights}], "seed")
        check_same(states + [{"seed": self.seed, "weights": self.weights}], "weights")
        self.epoch = int(check_same(states, "epoch"))
        for i, d in enumerate(self.datasets):
            d.load_state_dict([s["children"][i] for s in states])
        self._pending = states
        self._pass = None

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        pending, self._pending = self._pending, None
        n = len(self.datasets)
        draws, alive, gen = 0, [True] * n, 0
        if pending and len(pending) == 1 and pending[0].get("workers") == workers \
                and pending[0].get("worker") == worker:
            draws, alive = int(pending[0]["draws"]), list(pending[0]["alive"])
            gen = int(pending[0].get("gen", 0))
        elif pending:  # merged resume: a fresh, still seeded, draw sequence
            gen = 1 + sum(int(s.get("draws") or 0) for s in pending)
        rng = random.Random(f"{self.seed}/{self.epoch}/{workers}/{worker}/{gen}")
        for _ in range(draws):
            rng.random()
        self._pass = {"workers": workers, "worker": worker, "draws": draws, "alive": alive,
                      "gen": gen}
        return self._run(rng)

    def _run(self, rng: random.Random) -> Iterator[Any]:
        p = self._pass
        alive = p["alive"]
        its = [iter(d) for d in self.datasets]
        try:
            for _ in range(10**12):  # bounded: every draw consumes a sample or retires a source
                live = [w if a else 0.0 for w, a in zip(self.weights, alive)]
                total = sum(live)
                if total <= 0:
                    return
                u = rng.random() * total
                p["draws"] += 1
                i = max(j for j, w in enumerate(live) if w > 0)  # fallback against rounding
                for j, w in enumerate(live):
                    if w > 0 and u < w:
                        i = j
                        break
                    u -= w
                try:
                    s = next(its[i])
                except StopIteration:
                    alive[i] = False
                    if self.stop == "first":
                        return
                    continue
                yield s
        finally:
            for it in its:  # stop the sources' read-ahead threads now, not at garbage collection
                close = getattr(it, "close", None)
                if close is not None:
                    close()
