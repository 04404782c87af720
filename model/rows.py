"""Where a batch's steps lie in the decoder layers' rows: dense or packed.

The layers see a block batch as rows [M, d] (matrix products, norms and the feed-forward are
per row). *Dense*: row ``b*T + t`` for every step of the [B, T] grid, padding steps included
(rows B*T.. pad M to the row grid, :func:`~.decoder.token_rows`). *Packed*: only the real
steps, example after example (row ``offsets[b] + t`` for ``t < lengths[b]``; real steps are a
prefix of each block), so a padding step costs the layers nothing: mixed data's text batches
are ~19% padding (``bench train --simulate --data data/gpu_mixed4``), which the dense layout
ran through every product and norm of every layer, forward and backward.

Only the attention needs the [B, T] grid (its recurrence runs along t): its inputs are put
on the grid from the rows and its output taken back, by the attention I/O functions
(:mod:`.attention_io`, :mod:`.attention_io_triton`), the Triton kernels with the offsets and
lengths directly, the PyTorch path through :func:`dense` / :func:`undense`. The grid's
padding steps get zeros there; they write nothing into the memories (w = 0) and their outputs
are never read back (the stack and the heads mask them), as in the dense layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .attention_io import _zero_tail
from .batch import to_device


@dataclass(frozen=True)
class Rows:
    """A batch's B x T step grid in rows. ``index`` None: dense (row b*T + t). Packed, all
    long tensors on the batch's device: ``index`` [n] (b*T + t of each row), ``step`` [n] (its
    t), ``offsets`` / ``lengths`` [B] (each example's first row and real steps)."""

    B: int
    T: int
    n: int  # rows that hold steps (B*T dense; the real steps packed)
    index: Tensor | None = None
    step: Tensor | None = None
    offsets: Tensor | None = None
    lengths: Tensor | None = None
    # per (heads, padded length): the [n*H] rows of a [B,H,Tp,E] tensor flattened to [-1, E]
    # that each (row, head) reads (:func:`head_index`), made once per batch, not per layer
    _heads: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def packed(self) -> bool:
        return self.index is not None


def dense_rows(B: int, T: int) -> Rows:
    """Every step of the grid a row, b*T + t."""
    return Rows(B, T, B * T)


def as_rows(bt: tuple[int, int] | Rows | None) -> Rows | None:
    """The layers' ``bt`` argument as :class:`Rows`: ``(B, T)`` is the dense grid."""
    if bt is None or isinstance(bt, Rows):
        return bt
    return dense_rows(*bt)


def packed_rows(lengths: list[int] | tuple[int, ...], T: int, device) -> Rows:
    """The real steps of each example (``lengths``: host ints, each in 1..T) packed in rows,
    one host-to-device copy (pinned, not waited for on CUDA) for all of :class:`Rows`' tensors."""
    B = len(lengths)
    lens = torch.tensor(lengths, dtype=torch.long)
    if B == 0 or int(lens.min()) < 1 or int(lens.max()) > T:
        raise ValueError(f"step counts must lie in 1..{T} (the grid's length), got "
                         f"{list(lengths)[:8]}{'...' if B > 8 else ''}")
    offs = torch.cumsum(lens, 0) - lens
    n = int(lens.sum())
    # each real step's t: its row less its example's first row
    step = torch.arange(n) - torch.repeat_interleave(offs, lens, output_size=n)
    b = torch.repeat_interleave(torch.arange(B), lens, output_size=n)
    # each part at a 16-byte boundary: Triton specialises a pointer argument on its alignment
    # (the QKV kernel takes offsets and lengths), so an odd offset would compile a variant
    parts = [offs, lens, b * T + step, step]
    starts = [0]
    for p in parts:
        starts.append(starts[-1] + p.numel() + p.numel() % 2)
    host = torch.zeros(starts[-1], dtype=torch.long)
    for p, a in zip(parts, starts):
        host[a:a + p.numel()] = p
    flat = to_device(host, device)
    offs, lens, index, step = (flat[a:a + p.numel()] for p, a in zip(parts, starts))
    return Rows(B, T, n, index, step, offs, lens)


def head_index(rows: Rows, H: int, Tp: int) -> Tensor:
    """Packed rows: [n*H] long, the row of a [B,H,Tp,E] tensor viewed as [B*H*Tp, E] that
    (row i, head h) reads, at i*H + h ((b*H + h)*Tp + t)."""
    key = (H, Tp)
    if key not in rows._heads:
        b = (rows.index - rows.step) // rows.T
        h = torch.arange(H, device=b.device)
        rows._heads[key] = ((b[:, None] * H + h) * Tp + rows.step[:, None]).reshape(-1)
    return rows._heads[key]


class _ToGrid(torch.autograd.Function):
    """rows [M >= n, C] -> [B*T, C] (packed rows placed at their steps, padding steps zero)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, BT: int):
        ctx.save_for_backward(index)
        ctx.M = x.shape[0]
        return _to_grid(x, index, BT)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return _from_grid(grad, index, ctx.M), None, None


class _FromGrid(torch.autograd.Function):
    """[B*T, C] -> rows [M >= n, C] (the real steps' rows, rows n.. zero)."""

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, M: int):
        ctx.save_for_backward(index)
        ctx.BT = x.shape[0]
        return _from_grid(x, index, M)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (index,) = ctx.saved_tensors
        return _to_grid(grad, index, ctx.BT), None, None


def _to_grid(x: Tensor, index: Tensor, BT: int) -> Tensor:
    """x's first n rows at rows ``index`` of a zero [BT, C]."""
    out = x.new_zeros(BT, x.shape[1])
    out.index_copy_(0, index, x[:index.shape[0]])
    return out


def _from_grid(x: Tensor, index: Tensor, M: int) -> Tensor:
    """Rows ``index`` of x, then zero rows up to M."""
    n = index.shape[0]
    out = x.new_empty(M, x.shape[1])
    torch.index_select(x, 0, index, out=out[:n])
    _zero_tail(out, 0, n)
    return out


def dense(x: Tensor, rows: Rows) -> Tensor:
    """Rows [M >= n, C] -> [B*T, C] on the grid (padding steps zero; dense: x's first B*T rows,
    a view)."""
    if not rows.packed:
        return x if x.shape[0] == rows.n else x[:rows.n]
    return _ToGrid.apply(x, rows.index, rows.B * rows.T)


def undense(x: Tensor, rows: Rows, M: int) -> Tensor:
    """[B*T, C] on the grid -> rows [M >= n, C] (rows n.. zero): :func:`dense` undone."""
    if not rows.packed:
        return x if M == x.shape[0] else torch.nn.functional.pad(x, (0, 0, 0, M - x.shape[0]))
    return _FromGrid.apply(x, rows.index, M)


def to_rows(x: Tensor, rows: Rows, M: int) -> Tensor:
    """x [B,T,d] -> the layers' rows [M >= n, d] (rows n.. zero)."""
    return undense(x.reshape(rows.B * rows.T, x.shape[-1]), rows, M)


def from_rows(x: Tensor, rows: Rows) -> Tensor:
    """The layers' rows [M >= n, d] -> [B,T,d] (packed: padding steps zero)."""
    return dense(x, rows).view(rows.B, rows.T, x.shape[-1])
