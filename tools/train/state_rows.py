"""A batch's new states as per-example rows, with a backward that does not launch per row.

The runner hands each example's state on as one row of the batch's ``[B, state_size]`` tensor
(an ``unbind``: views, no copy). PyTorch's ``unbind`` backward materialises a zero tensor for
every row that got no gradient, then stacks the B rows: one fill launch per such row. Rows get
none whenever the example's next block runs after the optimizer step (its state is read
detached) or is its end head only, so on mixed data the H200 profile of 2 steps showed 780
``aten::zeros`` launches under ``UnbindBackward0`` (GPU_NOTES, P94), each a 4.9 MB fill, ~10 us of
the autograd thread's host time apiece. :func:`unbind_rows` returns the same views; its backward
writes the gradient rows that exist with one foreach copy and zeroes the rest with one foreach
fill, so the launch count no longer grows with the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor


class _UnbindRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # rows without a gradient arrive as None
        ctx.meta = (t.shape, t.dtype, t.device)
        return t.unbind(0)

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> Tensor | None:
        shape, dtype, device = ctx.meta
        have = [i for i, g in enumerate(grads) if g is not None]
        if not have:
            return None
        if len(have) == len(grads):
            return torch.stack(grads)  # what unbind's backward does with every row present
        out = torch.empty(shape, dtype=dtype, device=device)
        rows = out.unbind(0)
        torch._foreach_copy_([rows[i] for i in have], [grads[i] for i in have])
        torch._foreach_zero_([rows[i] for i in range(len(grads)) if grads[i] is None])
        return out


def unbind_rows(t: Tensor) -> tuple[Tensor, ...]:
    """``t.unbind(0)`` ([B, ...] -> B views [...]), with the backward described above. Without
    autograd (no gradient wanted, or inference mode) it is ``t.unbind(0)`` itself."""
    if not (t.requires_grad and torch.is_grad_enabled()):
        return t.unbind(0)
    return _UnbindRows.apply(t)
