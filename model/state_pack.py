"""Packing a block's new state into one row per example without copying what is in place.

The state handed between blocks is one fp32 row per example (:class:`~.decoder.StateLayout`).
Built by a concatenation of its parts, every batch that keeps its state copied all of it once
more after the layers had written it: ~1.2M floats an example in ``small``, ~97% of them the
layers' bank memories (device call P84: ``blocklm:pack_state`` 16.9 ms of kernels in 3 mixed
steps). Now the decoder allocates the packed rows first and hands each layer the slots of its
memories: the attention kernels write them there (``out`` of
:func:`~.banked_triton.banked_attention`), and :class:`PackInto` copies only the parts that are
not in place (the stack's cells, the summary, the tail; or everything, on the CPU path). Its
backward hands each part its columns of the gradient, as the concatenation's did.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .banked_backward import rows_contiguous


def in_place(part: Tensor, slot: Tensor) -> bool:
    """Whether ``part`` already is ``slot`` (same first element, dtype and row layout)."""
    B = part.shape[0]
    return (part.data_ptr() == slot.data_ptr() and part.dtype == slot.dtype
            and (B == 1 or part.stride(0) == slot.stride(0)) and rows_contiguous(part))


class PackInto(torch.autograd.Function):
    """``(buf [B, n], spans, *parts)`` -> buf holding part i (each [B, ...]) in its column span
    ``spans[i] = (a, b)``; parts that already lie there are not copied. buf must not be used
    otherwise (it becomes the packed state). Gradient: columns a..b of the packed state's
    gradient for part i, in its shape and dtype (views: no copy)."""

    @staticmethod
    def forward(ctx, buf: Tensor, spans: tuple[tuple[int, int], ...], *parts: Tensor):
        B = buf.shape[0]
        for (a, b), p in zip(spans, parts):
            dst, flat = buf.narrow(1, a, b - a), p.reshape(B, b - a)
            if not in_place(flat, dst):
                dst.copy_(flat)
        ctx.spans = spans
        ctx.shapes = [(p.shape, p.dtype) for p in parts]
        return buf

    @staticmethod
    def backward(ctx, g: Tensor):
        grads = [g.narrow(1, a, b - a).view(shape).to(dtype)
                 for (a, b), (shape, dtype) in zip(ctx.spans, ctx.shapes)]
        return (None, None, *grads)


def pack_into(buf: Tensor, spans: tuple[tuple[int, int], ...], parts: list[Tensor]) -> Tensor:
    """The packed state [B, n] in ``buf`` (see :class:`PackInto`)."""
    return PackInto.apply(buf, spans, *parts)
