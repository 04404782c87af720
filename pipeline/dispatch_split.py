"""Preparing an example's pieces, and splitting blocks that exceed the batch budget for modes
whose content can be cut in pieces.

A splitter is ``split(shape, inputs, targets, max_cost, cost) -> [(shape, inputs, targets), ...]``
(``cost(shape) -> int`` is the mode's cost function); pass ``splitters={mode: split}`` to the
dispatcher. Each piece becomes its own request (same block index, ``part`` 0, 1, ...), processed
in order, the context carried from piece to piece like from block to block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from blocklm.formats.errors import CodecUnavailableError

from .dispatch_types import PrepareError

Shape = tuple[int, ...]
# splitter(shape, inputs, targets, max_cost, cost_of_shape) -> [(shape, inputs, targets), ...]
Splitter = Callable[[Shape, Any, Any, int, Callable[[Shape], int]], list[tuple[Shape, Any, Any]]]


def split_first_axis(shape: Shape, inputs: Any, targets: Any, max_cost: int,
                     cost: Callable[[Shape], int]) -> list[tuple[Shape, Any, Any]]:
    """Cut a sequence-like block (text, audio) along its first axis into the fewest equal-length
    pieces (the last one shorter) that each cost at most ``max_cost``. ``inputs``/``targets``
    must be sliceable along the first axis (``str``, ``list``, numpy arrays) or ``None``."""
    if not shape:
        raise ValueError("cannot split a block without dimensions")
    n, rest = shape[0], tuple(shape[1:])
    if cost((1, *rest)) > max_cost:
        raise ValueError(f"even a length-1 slice of shape {list(shape)} costs more than "
                         f"{max_cost} tokens")
    lo, hi = 1, max(1, n)
    while lo < hi:  # the longest piece that fits (cost grows with the length)
        mid = (lo + hi + 1) // 2
        if cost((mid, *rest)) <= max_cost:
            lo = mid
        else:
            hi = mid - 1
    out = []
    for a in range(0, n, lo):
        b = min(n, a + lo)
        out.append(((b - a, *rest),
                    None if inputs is None else inputs[a:b],
                    None if targets is None else targets[a:b]))
    return out


def prepare_pieces(sample: Any, decode: bool, prepare: Callable[[Any], tuple] | None,
                   splitters: Mapping[str, Splitter], costs: Mapping[str, Callable[[Shape], int]],
                   budgets: Mapping[str, int]) -> list[tuple]:
    """``(block, part, mode, shape, inputs, targets)`` for every block of ``sample``: inputs and
    targets from ``prepare(block)``, else both ``block.decode()`` (``decode``) or the block
    itself; blocks over their mode's budget cut by the mode's splitter when it has one. The
    shape is the block's, unless ``prepare`` returns a third item that is not None: the shape
    it measured from the prepared content (the trainer's text: its exact token count in the
    cost model's characters), under which the block is charged and bucketed. Runs in
    the read-ahead thread. Raises :class:`PrepareError` naming the sample and block, or
    :class:`~blocklm.formats.errors.CodecUnavailableError` (a decoder's library cannot be
    loaded: every block of its codec would fail, so the run stops rather than reject them)."""
    pieces: list[tuple] = []
    for i, b in enumerate(sample.blocks):
        mode, shape = b.mode, tuple(b.shape)
        try:
            if prepare is not None:
                got = prepare(b)
                inputs, targets = got[0], got[1]
                if len(got) > 2 and got[2] is not None:
                    shape = tuple(got[2])
            elif decode:
                inputs = targets = b.decode()
            else:
                inputs = targets = b
            split = splitters.get(mode) if splitters else None
            mc = costs.get(mode) if split is not None else None
            if mc is not None and mc(shape) > budgets[mode]:
                for j, (s, x, y) in enumerate(split(shape, inputs, targets, budgets[mode], mc)):
                    pieces.append((i, j, mode, tuple(s), x, y))
                continue
        except CodecUnavailableError as e:  # the environment's fault, not the sample's
            raise CodecUnavailableError(f"sample {sample.key!r}, block {i}, mode {mode!r}: {e}") \
                from e
        except Exception as e:
            raise PrepareError(f"{type(e).__name__}: {e}", key=sample.key, block=i,
                               mode=mode) from e
        pieces.append((i, 0, mode, shape, inputs, targets))
    return pieces
