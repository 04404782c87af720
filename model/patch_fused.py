"""The within-step element head and its loss as plain functions of tensors, for ``torch.compile``.

The image and audio heads (:class:`~blocklm.model.patch.ElementHead`) turn every decoder step
into ``E`` rows of a small MLP (E = 256 sub-pixels of an 8x8 patch at ``small``), so their
tensors are ``E`` times the decoder's: [rows, E, width] for the inputs and [rows, E, 256] logits.
Run op by op, each of the ~20 elementwise steps (the value lookup, its cumulative sum, adds,
GELUs, casts, the logits' fp32 copy, log-softmax, the mask) reads and writes one of those
tensors, forward, again in the checkpointed slice's recompute, and in backward: on the H200 most
of a mixed step's "other" kernel time (GPU_NOTES, P20-P23). :func:`slice_bits` is the whole head
plus its loss for one slice of rows, with explicit casts, so Inductor can fuse the elementwise
work around the two matrix products and the cross-entropy into a few kernels
(``ImageConfig.compile_head`` / ``AudioConfig.compile_head``); uncompiled it is the head's one
implementation (:meth:`ElementHead.logits` and the loss call the same code).

Casts follow the eager head under bf16 autocast: the context projection's matrix product in
``lp`` widened to fp32 before the fp32 position and value sums, GELU in fp32 then ``lp`` into the
first linear, the second GELU on ``lp`` values, logits in ``lp``, the cross-entropy in fp32.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from .layer_fused import dynamic_dims
from .support import LN2


def _lin(x: Tensor, w: Tensor, b: Tensor | None, lp: torch.dtype | None) -> Tensor:
    if lp is None:  # no explicit casts: autocast (or fp32) decides
        return F.linear(x, w, b)
    return F.linear(x.to(lp), w.to(lp), None if b is None else b.to(lp))


def element_logits(h: Tensor, values: Tensor, ctx_w: Tensor, ctx_b: Tensor, pos: Tensor,
                   val: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                   lp: torch.dtype | None) -> Tensor:
    """h [..., d], values [..., E] long (teacher forcing) -> logits [..., E, V].

    ``val`` is the value table viewed as [E*V, width]: element e's row for value x is e*V + x.
    ``lp``: the precision of the matrix products (explicit casts; see :func:`low_precision`), or
    None for none (fp32, or autocast's own casts where it is on)."""
    E, V = pos.shape[0], val.shape[0] // pos.shape[0]
    c = _lin(h, ctx_w, ctx_b, lp)[..., None, :].float() + pos  # [..., E, w] fp32
    # one embedding lookup into the [E*V, w] table: its backward sums duplicate rows by
    # segments, where advanced indexing's backward (index_put with accumulate) serialises them
    # (32 ms of a mixed step's GPU time on the H200; most rows repeat)
    ve = F.embedding(values + torch.arange(E, device=values.device) * V, val)  # [..., E, w]
    prev = ve.cumsum(-2) - ve  # the sum over the earlier elements of the same step
    x = F.gelu(c + prev.float())
    y = F.gelu(_lin(x, w1, b1, lp))
    return _lin(y, w2, b2, lp)  # [..., E, V]


def low_precision(device_type: str) -> torch.dtype | None:
    """The matrix products' precision where the head runs: autocast's dtype when autocast is
    on for ``device_type``, else None (no casts)."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def make_slice_bits(lp: torch.dtype | None):
    """:func:`slice_bits` for one precision (a constant of the closure, not a guarded input)."""

    def slice_bits(h: Tensor, targets: Tensor, mask: Tensor, ctx_w: Tensor, ctx_b: Tensor,
                   pos: Tensor, val: Tensor, w1: Tensor, b1: Tensor, w2: Tensor,
                   b2: Tensor) -> Tensor:
        """h [M, d], targets [M, E] long, mask [M, E] bool -> bits per row [M] fp32 (rows the
        mask leaves out cost 0; padding rows have target 0 and an all-False mask)."""
        with torch.autocast(device_type=h.device.type, enabled=False):  # casts are explicit
            logits = element_logits(h, targets, ctx_w, ctx_b, pos, val, w1, b1, w2, b2, lp)
            M, E, V = logits.shape
            nll = F.cross_entropy(logits.float().view(M * E, V), targets.reshape(M * E),
                                  reduction="none").view(M, E)
            return (nll * mask).sum(1) / LN2
    return slice_bits


# the rows vary from call to call (batch x slice length, padded to the row grid); widths,
# E and V are static
_DYN = {0: (0,), 1: (0,), 2: (0,)}


@functools.cache
def slice_bits_fn(form: str, lp: torch.dtype | None):
    """:func:`make_slice_bits` in ``form``: "eager" (the plain function) or a
    ``torch.compile`` backend ("inductor" on CUDA; "aot_eager" in CPU tests), compiled once
    per process and precision with the rows dynamic (one graph for every slice and batch)."""
    fn = make_slice_bits(lp)
    if form == "eager":
        return fn
    return dynamic_dims(torch.compile(fn, backend=form), _DYN)
