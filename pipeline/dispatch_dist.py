"""How ranks stay in step: before every runner step, all ranks agree on the mode to run.

Every rank proposes ``(active, urgency, age, mode_index)``: ``active`` is 0 once the rank has
nothing left (source exhausted, no example in flight); ``urgency`` is 2 if its most urgent bucket
outlived the TTL, 1 if a bucket is full, 0 if it can only run a partial batch (stall, drain);
``age`` the age of that bucket's oldest request; ``mode_index`` its mode's index in the sorted
list of runner modes. An *agree* function all-gathers the proposals; every rank then applies the
same :func:`choose` (highest urgency, then oldest, then lowest mode index, then lowest rank) and
runs one batch of the chosen mode: its own most urgent bucket of that mode if one is due (or, when
it is itself stalled or draining, a partial one), else an **empty batch**. The run ends when no
rank is active. So every rank runs exactly the same number of runner steps, of the same modes in
the same order, and an optimizer step every ``M`` runner steps falls at the same point everywhere
(gradient all-reduce never hangs, and each mode's head takes part in the same steps).

``local_agree`` serves a single process; ``torch_agree`` uses ``torch.distributed`` (one small
all-gather of 4 integers per step); ``SimulatedGroup`` runs several in-process ranks in threads
for tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

Proposal = tuple[int, int, int, int]  # (active, urgency, age, mode_index)
Agree = Callable[[Proposal], Sequence[Proposal]]
IDLE: Proposal = (0, 0, 0, 0)


def local_agree(p: Proposal) -> list[Proposal]:
    """A single rank agrees with itself."""
    return [p]


def choose(proposals: Sequence[Proposal]) -> int | None:
    """The index (rank) of the winning proposal, or ``None`` when no rank is active."""
    best, best_i = None, None
    for i, p in enumerate(proposals):
        if not p[0]:
            continue
        k = (p[1], p[2], -p[3])
        if best is None or k > best:
            best, best_i = k, i
    return best_i


def torch_agree(group=None, device=None) -> Agree:
    """All-gather proposals over ``torch.distributed`` (call after ``init_process_group``).

    ``device`` must be a CUDA device for NCCL; CPU (the default) suits gloo.
    """
    import torch
    import torch.distributed as dist

    world = dist.get_world_size(group)

    def agree(p: Proposal) -> list[Proposal]:
        t = torch.tensor(p, dtype=torch.int64, device=device)
        out = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(out, t, group=group)
        return [tuple(int(v) for v in o.tolist()) for o in out]  # type: ignore[misc]

    return agree


class SimulatedGroup:
    """``n`` ranks in one process (threads): ``group.agree(rank)`` is that rank's agree function.

    Every rank must call its agree function the same number of times, as with a real
    all-gather; a rank that stops early would leave the others waiting (``timeout`` seconds, then
    ``threading.BrokenBarrierError``), which is exactly the hang the protocol prevents.
    """

    def __init__(self, n: int, timeout: float = 30.0) -> None:
        self.n = n
        self._slots: list[Proposal] = [IDLE] * n
        self._barrier = threading.Barrier(n, timeout=timeout)
        self.calls = [0] * n

    def agree(self, rank: int) -> Agree:
        def fn(p: Proposal) -> list[Proposal]:
            self.calls[rank] += 1
            self._slots[rank] = p
            self._barrier.wait()
            out = list(self._slots)
            self._barrier.wait()  # nobody overwrites a slot before everyone has read them all
            return out

        return fn
