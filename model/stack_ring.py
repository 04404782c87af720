"""The ring layout of the stack's cells inside the per-iteration kernels (``StackConfig.ring``).

The reference (stack.py) keeps cell 0 on top and shifts V [B,K,W] down one row on every push,
which the kernels of stack_ctrl.py did too: a read and a write of [K,W] per example and
iteration. With ``RING`` the rows stay where they are and each example has a head (int32): the
cell ``k`` rows below the top lives in row ``(head + k) mod K``, a push moves the head up one row
(mod K) and writes its cell there, into the row of the old bottom cell, which so falls off as in
the reference. The strengths s [B,K] (1/W of V's bytes) stay top-first, so the mass sums are as
before. Only inside a graph chunk: stack_ctrl_loop.CtrlRunner starts each chunk's ring at head 0
(the state's own layout) and rotates it back at the end, so the decoder's state, the tests and a
resumed training state see the usual layout.

Going back through a chunk, the backward needs each iteration's input state: the recompute saves
the bottom cell each push overwrote ([B,W] per iteration), the backward kernel reads it in place
of the overwritten row (``lost``) and writes it back, and the ring's gradient is updated in place.

With ``ACTIVE`` the passes load only the rows whose product is used: a read weight is zero below
the top unit of mass, a popped mass below what the pop reaches, and a row with neither keeps its
gradient (in place, nothing to write). The zero terms left out are exact zeros, so the values are
the same; the backward's passes still load the empty cells (s == 0), whose strength gradients
the reference's tie rules keep.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _rows(HD, g, mg, k, K: tl.constexpr, RING: tl.constexpr):
    # the head [G] and the row [G,BK] of logical cell k (0 = top): with RING counted from
    # the example's head (a push moves the head up one row instead of shifting the cells)
    if RING:
        hd = tl.load(HD + g, mask=mg, other=0)
        return hd, (hd[:, None] + k[None, :]) % K
    else:
        return g * 0, k[None, :]  # [1,BK]: broadcast, as before the ring


@triton.jit
def _act(mgk, active, ON: tl.constexpr):
    # the rows [G,BK] a pass loads: all, or (ON) only the ``active`` ones
    if ON:
        return mgk & active
    else:
        return mgk


@triton.jit
def _top(hd, off, K: tl.constexpr, RING: tl.constexpr):
    # the row a push of ``off`` (0 or 1) writes its cell to: the old bottom's with RING
    if RING:
        return (hd - off + K) % K
    else:
        return off * 0


@triton.jit
def _vload(V, BOT, g, mg, row, lost, w, m3, K: tl.constexpr, W: tl.constexpr,
           RING: tl.constexpr):
    # the cells [G,BK,WCH] of the iteration's input state; the row a push overwrote
    # (``lost``, RING only) holds the new cell, the input's bottom cell is in BOT
    v = tl.load(V + g[:, None, None] * K * W + row[:, :, None] * W + w[None, None, :],
                mask=m3 & ~lost[:, :, None], other=0.0)
    if RING:
        bot = tl.load(BOT + g[:, None] * W + w[None, :], mask=mg[:, None] & (w < W)[None, :],
                      other=0.0)
        v = tl.where(lost[:, :, None], bot[:, None, :], v)
    return v
