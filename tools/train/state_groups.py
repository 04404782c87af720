"""Compacting the in-flight examples' states at each optimizer step (the trainer's memory).

A batch's runner returns its examples' states as rows of one ``[B, state_size]`` fp32 tensor
(``unbind``: one autograd node, see :mod:`.runner`), each held by the dispatcher in a
:class:`~.runner.Context` until the example's next block runs. A row is a view: it keeps the
whole batch's storage alive, and, until it is read (detached) in a later window, the autograd
nodes that made it. Chained mixed data keeps a few stragglers of many batches in flight (an
image's or a clip's caption waits for its text bucket): in ``bench train`` on the H200 the peak
memory of ``small`` on ``data/gpu_mixed4`` rose step after step, 37 -> 129 GiB over 36 steps,
and the run without the window cap went out of memory (call D2). A CPU count of the same run
(``/tmp``-style, no model): 8-12 GiB of live states pinned 40-67 GiB of batch storage.

At each window's close (:meth:`StateGroups.close`, after the optimizer step, when the window's
activations are gone) the rows still held are detached, and a group whose live rows fill at most
half its storage is copied into a tensor of just those rows (one ``stack``), so pinned storage
stays within twice the live states. Values do not change, and neither do gradients: a state
made in a closed window is detached when it is read anyway.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


class _Group:
    __slots__ = ("refs", "rows", "fresh")

    def __init__(self, contexts: list[Any], rows: int, fresh: bool) -> None:
        self.refs = [weakref.ref(c) for c in contexts]
        self.rows = rows  # rows in the storage the contexts' states view
        self.fresh = fresh  # made in the open window: the states still carry its graph


class StateGroups:
    """The contexts whose states share one batch's storage, per batch (weakly held: a context
    gone, or spent (read by its example's next block or end head), no longer counts)."""

    def __init__(self) -> None:
        self._groups: list[_Group] = []

    def add(self, contexts: list[Any], rows: int) -> None:
        """Register one batch's contexts (their ``state`` rows of a ``[rows, ...]`` tensor)."""
        self._groups.append(_Group(contexts, rows, True))

    def close(self) -> None:
        """At a window's close: detach the live states, compact the groups at most half live."""
        keep = []
        for g in self._groups:
            live = [c for c in (r() for r in g.refs)
                    if c is not None and c.state is not None and not c.spent]
            if not live:
                continue
            if 2 * len(live) <= g.rows:
                rows = torch.stack([c.state.detach() for c in live]).unbind(0)
                for c, row in zip(live, rows):
                    c.state, c.head = row, None
                keep.append(_Group(live, len(live), False))
                continue
            if g.fresh:
                for c in live:  # the head tail is sliced from the state (runner._head_states)
                    c.state, c.head = c.state.detach(), None
                g.fresh = False
            keep.append(g)
        self._groups = keep

    def __len__(self) -> int:
        return len(self._groups)
