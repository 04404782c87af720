""":class:`~blocklm.model.attention_io.KernelGates` as one Triton kernel each way (CUDA).

The PyTorch version is ~12 launches forward (a widening copy, two softmaxes, the transposing
copies into the kernels' layout, the mask's product, sigmoid, clamp, the tails' fills) and ~10
backward, per layer and batch; on packed rows (:mod:`.rows`) the logits also go to the grid and
their gradient back (``dense``: a zero fill and an index copy each way). In 2 mixed steps on the
H200 ``KernelGatesBackward`` alone made 636 launches (GPU_NOTES, P94) for ~10 ms of kernels.
Here each direction is one launch: a program takes one head's tile of steps, reads the logits'
rows where they lie (``b*T + t``, or ``offsets[b] + t`` on packed rows), and writes the gates in
the kernels' layout; the backward recomputes the softmaxes and the sigmoid from the logits
(nothing saved but the logits) and writes the logits' gradient rows. Same values as the PyTorch
version (fp32 arithmetic, one rounding to the logits' dtype), which stays the CPU path and the
reference (tests/model/test_attention_gates_triton.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention_io import _zero_tail
from .attention_io_triton import _tile
from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .attention_io_triton import _rows

    @triton.jit
    def _gate_values(sel, row0, t, live, s_row, h, H, N: tl.constexpr, NP: tl.constexpr):
        """Softmax of the read and of the write logits [BT, NP] (columns N.. zero) and the
        retention's sigmoid [BT] of one head at steps t, fp32. Steps that are not live read
        zero logits (as the grid's padding: uniform softmaxes, sigmoid 1/2)."""
        n = tl.arange(0, NP)
        mn = (n < N)[None, :]
        m = live[:, None] & mn
        base = sel + (row0 + t)[:, None] * s_row
        lr = tl.load(base + (h * N + n)[None, :], mask=m, other=0.0).to(tl.float32)
        lw = tl.load(base + ((H + h) * N + n)[None, :], mask=m, other=0.0).to(tl.float32)
        lg = tl.load(sel + (row0 + t) * s_row + 2 * H * N + h, mask=live,
                     other=0.0).to(tl.float32)
        lr = tl.where(mn, lr, float("-inf"))
        lw = tl.where(mn, lw, float("-inf"))
        er = tl.exp(lr - tl.max(lr, 1)[:, None])
        ew = tl.exp(lw - tl.max(lw, 1)[:, None])
        r = er / tl.sum(er, 1)[:, None]
        w = ew / tl.sum(ew, 1)[:, None]
        return r, w, 1.0 / (1.0 + tl.exp(-lg))

    @triton.jit
    def _write_mask(mask, b, t, T, live, HAS_MASK: tl.constexpr):
        """Which steps write [BT]: the mask's (dense grid) or the live steps (packed rows are
        the mask's prefix; no mask: every step of the grid)."""
        if HAS_MASK:
            return tl.load(mask + b * T + t, mask=t < T, other=0) != 0
        return live

    @triton.jit
    def _gates_fwd(sel, mask, rw, g, B, T, Tp, H, s_row, offs, lens, BT: tl.constexpr,
                   N: tl.constexpr, NP: tl.constexpr, PACKED: tl.constexpr,
                   HAS_MASK: tl.constexpr):
        """rw [2,B,H,Tp,N] (read, write) and g [B,H,Tp] of head h at one tile of steps; steps
        T.. write nothing (w = 0, g = 1, r = 0)."""
        ntb = Tp // BT
        b, tb = tl.program_id(0) // ntb, tl.program_id(0) % ntb
        h = tl.program_id(1)
        t = tb * BT + tl.arange(0, BT)
        n = tl.arange(0, NP)
        row0, live = _rows(b, t, T, offs, lens, PACKED)
        r, w, sg = _gate_values(sel, row0, t, live, s_row, h, H, N, NP)
        grid = (t < T)[:, None]
        wm = _write_mask(mask, b, t, T, live, HAS_MASK)[:, None]
        r = tl.where(grid, r, 0.0)
        w = tl.where(grid & wm, w, 0.0)
        gg = tl.where(t < T, tl.maximum(sg, 1e-6), 1.0)
        off = (b * H + h).to(tl.int64) * Tp + t  # [BT] step offsets in [B,H,Tp]
        dst = off[:, None] * N + n[None, :]
        mn = (n < N)[None, :]
        tl.store(rw + dst, r, mask=mn)
        tl.store(rw + (B * H * Tp * N).to(tl.int64) + dst, w, mask=mn)
        tl.store(g + off, gg)

    @triton.jit
    def _gates_bwd(sel, mask, dr, dw, dg, dsel, T, Tp, H, s_row, offs, lens, BT: tl.constexpr,
                   N: tl.constexpr, NP: tl.constexpr, PACKED: tl.constexpr,
                   HAS_MASK: tl.constexpr, HAS_R: tl.constexpr, HAS_W: tl.constexpr,
                   HAS_G: tl.constexpr):
        """The logits' gradient rows of head h at one tile of steps (live steps only): the
        softmaxes' backward (``y * (d - sum(d * y))``, the write's d masked) and the
        sigmoid's (passed where the clamp did not hold it)."""
        ntb = Tp // BT
        b, tb = tl.program_id(0) // ntb, tl.program_id(0) % ntb
        h = tl.program_id(1)
        t = tb * BT + tl.arange(0, BT)
        n = tl.arange(0, NP)
        mn = (n < N)[None, :]
        row0, live = _rows(b, t, T, offs, lens, PACKED)
        r, w, sg = _gate_values(sel, row0, t, live, s_row, h, H, N, NP)
        off = (b * H + h).to(tl.int64) * Tp + t
        src = off[:, None] * N + n[None, :]
        m = live[:, None] & mn
        gr = tl.zeros([BT, NP], dtype=tl.float32)
        gw = tl.zeros([BT, NP], dtype=tl.float32)
        gs = tl.zeros([BT], dtype=tl.float32)
        if HAS_R:
            d = tl.load(dr + src, mask=m, other=0.0).to(tl.float32)
            gr = r * (d - tl.sum(d * r, 1)[:, None])
        if HAS_W:
            wm = _write_mask(mask, b, t, T, live, HAS_MASK)[:, None]
            d = tl.load(dw + src, mask=m & wm, other=0.0).to(tl.float32)
            gw = w * (d - tl.sum(d * w, 1)[:, None])
        if HAS_G:
            d = tl.load(dg + off, mask=live, other=0.0).to(tl.float32)
            gs = tl.where(sg >= 1e-6, d, 0.0) * (1.0 - sg) * sg
        base = dsel + (row0 + t)[:, None] * s_row
        ty = dsel.dtype.element_ty
        tl.store(base + (h * N + n)[None, :], gr.to(ty), mask=m)
        tl.store(base + ((H + h) * N + n)[None, :], gw.to(ty), mask=m)
        tl.store(dsel + (row0 + t) * s_row + 2 * H * N + h, gs.to(ty), mask=live)


def gates_triton_ok(sel: Tensor, Tp: int) -> bool:
    """Whether :class:`KernelGatesTriton` serves these logits (CUDA, rows of unit stride,
    whole tiles of 16 steps)."""
    return (HAS_TRITON and sel.is_cuda and sel.dim() == 2 and sel.stride(1) == 1
            and Tp % 16 == 0)


class KernelGatesTriton(torch.autograd.Function):
    """Same contract as :class:`~blocklm.model.attention_io.KernelGates`, one kernel each way.
    An eighth argument, packed :class:`~blocklm.model.rows.Rows`, reads the logits' rows where
    the packing put them (the mask is then the prefix of each example's length, as packing
    requires) and writes their gradient back there (rows n.. zero)."""

    @staticmethod
    def forward(ctx, sel: Tensor, mask: Tensor | None, B: int, T: int, Tp: int, H: int, N: int,
                rows=None):
        rw = sel.new_empty(2, B, H, Tp, N, dtype=torch.float32)
        g = sel.new_empty(B, H, Tp, dtype=torch.float32)
        offs, lens = (sel, sel) if rows is None else (rows.offsets, rows.lengths)  # (unread)
        has_mask = mask is not None and rows is None
        # bool as bytes (the kernel tests != 0); unread without the flag
        mk = mask.contiguous().view(torch.uint8) if has_mask else sel
        BT, NP = _tile(Tp), triton.next_power_of_2(N)
        _gates_fwd[(B * (Tp // BT), H)](sel, mk, rw, g, B, T, Tp, H, sel.stride(0), offs, lens,
                                        BT=BT, N=N, NP=NP, PACKED=rows is not None,
                                        HAS_MASK=has_mask, num_warps=2)
        ctx.save_for_backward(sel, mk, offs, lens)
        ctx.dims = (B, T, Tp, H, N, B * T if rows is None else rows.n, rows is not None,
                    has_mask)
        return (*rw.unbind(0), g)

    @staticmethod
    def backward(ctx, dr: Tensor | None, dw: Tensor | None, dg: Tensor | None):
        sel, mk, offs, lens = ctx.saved_tensors
        B, T, Tp, H, N, n, packed, has_mask = ctx.dims
        dsel = sel.new_empty(sel.shape)
        _zero_tail(dsel, 0, n)  # padding rows: no gradient
        grads = [None if x is None else x.contiguous() for x in (dr, dw, dg)]
        BT, NP = _tile(Tp), triton.next_power_of_2(N)
        _gates_bwd[(B * (Tp // BT), H)](
            sel, mk, *[dsel if x is None else x for x in grads], dsel, T, Tp, H, sel.stride(0),
            offs, lens, BT=BT, N=N, NP=NP, PACKED=packed, HAS_MASK=has_mask,
            HAS_R=grads[0] is not None, HAS_W=grads[1] is not None,
            HAS_G=grads[2] is not None, num_warps=2)
        return dsel, None, None, None, None, None, None, None
