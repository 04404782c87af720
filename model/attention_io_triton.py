""":class:`~blocklm.model.attention_io.KernelQKV` as one Triton kernel each way (CUDA).

The PyTorch version needs five passes forward (a strided widening copy of q and k to fp32,
``elu``, ``+ 1`` written into the kernels' layout, v's copy, the padded steps' fill) and four
backward (q and k widened again, ``elu_backward``, v's copy, a fill): on the H200 ~33 ms of a
390 ms profiled text step (call P1b, `KernelQKV` 17 ms forward, `KernelQKVBackward` 15 ms).
Here each direction reads its operands once and writes its result once, in place of those
chains, with the same values: the feature map ``elu(x) + 1`` (``x + 1`` above zero, ``exp(x)``
below) in fp32 rounded once to bf16; its gradient ``g`` above zero and ``g * exp(x)`` below, in
fp32, rounded once to ``qkv``'s dtype. The PyTorch version stays the CPU path and the reference
these kernels are tested against (tests/model/test_attention_io_triton.py, CUDA only).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention_io import KERNEL_DTYPE, _zero_tail
from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _rows(b, t, T, offs, lens, PACKED: tl.constexpr):
        """Example b's step-0 row (int64) and which of steps t are real, [BT]: b*T and t < T
        on the dense grid, offs[b] and t < lens[b] on packed rows."""
        if PACKED:
            row0 = tl.load(offs + b)
            live = t < tl.load(lens + b)
        else:
            row0 = (b * T).to(tl.int64)
            live = t < T
        return row0, live

    @triton.jit
    def _qkv_fwd(qkv, out, B, T, Tp, H, s_row, offs, lens, BT: tl.constexpr, D: tl.constexpr,
                 PACKED: tl.constexpr):
        """One [BT, D] tile of (operand c, batch b, head h, steps t): q and k through the
        feature map, v as is, steps T.. zero. qkv [M, 3*H*D] rows b*T + t (PACKED: rows
        offs[b] + t, steps lens[b].. zero); out [3,B,H,Tp,D]."""
        ntb = Tp // BT
        b, tb = tl.program_id(0) // ntb, tl.program_id(0) % ntb
        ch = tl.program_id(1)  # c * H + h: the column block of qkv
        c = ch // H
        t = tb * BT + tl.arange(0, BT)
        d = tl.arange(0, D)
        row0, live = _rows(b, t, T, offs, lens, PACKED)
        live = live[:, None]
        src = qkv + (row0 + t)[:, None] * s_row + (ch * D + d)[None, :]
        x = tl.load(src, mask=live, other=0.0).to(tl.float32)
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))  # elu(x) + 1
        y = tl.where(live, tl.where(c < 2, phi, x), 0.0)
        dst = out + ((c * B + b) * H + ch % H).to(tl.int64) * Tp * D + (t * D)[:, None] + d[None, :]
        tl.store(dst, y.to(out.dtype.element_ty))

    @triton.jit
    def _qkv_bwd(qkv, dq, dk, dv, dqkv, T, Tp, H, s_row, offs, lens, HAS_Q: tl.constexpr,
                 HAS_K: tl.constexpr, HAS_V: tl.constexpr, BT: tl.constexpr, D: tl.constexpr,
                 PACKED: tl.constexpr):
        """dqkv's [BT, D] tile of (c, b, h, t) from the contiguous [B,H,Tp,D] gradient of
        operand c (zero where it is None): the feature map's backward for q and k. Rows as in
        :func:`_qkv_fwd`."""
        ntb = Tp // BT
        b, tb = tl.program_id(0) // ntb, tl.program_id(0) % ntb
        h, c = tl.program_id(1), tl.program_id(2)
        t = tb * BT + tl.arange(0, BT)
        d = tl.arange(0, D)
        row0, live = _rows(b, t, T, offs, lens, PACKED)
        live = live[:, None]
        goff = (b * H + h).to(tl.int64) * Tp * D + (t * D)[:, None] + d[None, :]
        g = tl.zeros([BT, D], dtype=tl.float32)
        if c == 0:
            if HAS_Q:
                g = tl.load(dq + goff, mask=live, other=0.0).to(tl.float32)
        elif c == 1:
            if HAS_K:
                g = tl.load(dk + goff, mask=live, other=0.0).to(tl.float32)
        else:
            if HAS_V:
                g = tl.load(dv + goff, mask=live, other=0.0).to(tl.float32)
        rows = (row0 + t)[:, None] * s_row + ((c * H + h) * D + d)[None, :]
        x = tl.load(qkv + rows, mask=live & (c < 2), other=1.0).to(tl.float32)
        y = tl.where(x > 0, g, g * tl.exp(x))  # v: x = 1 (not loaded) keeps g
        tl.store(dqkv + rows, y.to(dqkv.dtype.element_ty), mask=live)


def _tile(Tp: int) -> int:
    """Steps per program: 64, or smaller where the padded length is not a multiple of it."""
    return next(bt for bt in (64, 32, 16) if Tp % bt == 0)


def qkv_triton_ok(qkv: Tensor, Tp: int, D: int) -> bool:
    """Whether :class:`KernelQKVTriton` serves these operands (CUDA, a power-of-two head width
    of at least 16, whole tiles of 16 steps, rows of unit stride)."""
    return (HAS_TRITON and qkv.is_cuda and qkv.dim() == 2 and qkv.stride(1) == 1
            and D >= 16 and D & (D - 1) == 0 and Tp % 16 == 0)


class KernelQKVTriton(torch.autograd.Function):
    """Same contract as :class:`~blocklm.model.attention_io.KernelQKV`, one kernel each way.
    A seventh argument, packed :class:`~blocklm.model.rows.Rows`, reads qkv's rows where the
    packing put them (``offsets[b] + t``; steps past each example's length zero) and writes
    the gradient back there (rows n.. zero)."""

    @staticmethod
    def forward(ctx, qkv: Tensor, B: int, T: int, Tp: int, H: int, D: int, rows=None):
        buf = qkv.new_empty(3, B, H, Tp, D, dtype=KERNEL_DTYPE)
        BT = _tile(Tp)
        offs, lens = (qkv, qkv) if rows is None else (rows.offsets, rows.lengths)  # (unread)
        _qkv_fwd[(B * (Tp // BT), 3 * H)](qkv, buf, B, T, Tp, H, qkv.stride(0), offs, lens,
                                           BT=BT, D=D, PACKED=rows is not None, num_warps=4)
        ctx.save_for_backward(qkv, offs, lens)
        ctx.dims = (B, T, Tp, H, D, B * T if rows is None else rows.n, rows is not None)
        return buf.unbind(0)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        qkv, offs, lens = ctx.saved_tensors
        B, T, Tp, H, D, n, packed = ctx.dims
        dqkv = qkv.new_empty(qkv.shape)
        _zero_tail(dqkv, 0, n)  # padding rows: no gradient
        grads = [None if x is None else x.contiguous() for x in (dq, dk, dv)]
        dummy = dqkv  # never read: its flag is off
        BT = _tile(Tp)
        _qkv_bwd[(B * (Tp // BT), H, 3)](
            qkv, *[dummy if x is None else x for x in grads], dqkv, T, Tp, H, qkv.stride(0),
            offs, lens, HAS_Q=grads[0] is not None, HAS_K=grads[1] is not None,
            HAS_V=grads[2] is not None, BT=BT, D=D, PACKED=packed, num_warps=4)
        return dqkv, None, None, None, None, None, None
