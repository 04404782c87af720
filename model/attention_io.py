"""The attention's inputs and output in the Triton kernels' layout, each made by one pass.

The kernels take q, k, v [B,H,Tp,D] bf16, contiguous, time padded to whole kernel blocks
(Tp >= T), and return o [B,H,Tp,E]. Built from autograd's ops, the layer got there through a
chain of copies (forward: widen q, k to fp32, feature map, cast q and k back, pad q, k, v each
with a fill and a copy; backward: a copy per pad, cast q and k up, stack them, the feature map's
backward, cast down, concatenate with v, a zero-filled [M, 3HD] for the rows slice) and came
back from the kernel's output through a slice, a transposing copy and a pad. On the H200 these
copies and casts were ~45 ms of a 325 ms text step (device call D4: ``direct_copy``,
``bfloat16_copy``, the strided ``nocast`` kernels, DtoD memcpys). Here each direction writes its
result into a preallocated tensor in the target layout with one op per operand (outputs given
as strided views); the values are those of the op chain they replace (the feature map is
computed in fp32 and rounded once, its gradient is that of ``elu``).
"""

from __future__ import annotations

import torch
from torch import Tensor

# the kernels' operand dtype (tests under the Triton interpreter, which has no bf16, set fp32)
KERNEL_DTYPE = torch.bfloat16


def _first(t: Tensor, dim: int, n: int) -> Tensor:
    """t's first n entries along dim; t itself when that is all of it. (narrow, unbind and
    split: one view op each; Python indexing of 4-5 dims made one per dim, host time.)"""
    return t if t.shape[dim] == n else t.narrow(dim, 0, n)


def _zero_tail(t: Tensor, dim: int, n: int, value: float = 0.0) -> None:
    """Fill t's entries from n on along dim (padding: rows or steps)."""
    if t.shape[dim] > n:
        t.narrow(dim, n, t.shape[dim] - n).fill_(value)


class KernelQKV(torch.autograd.Function):
    """qkv [M >= B*T, 3*H*D] (rows B*T.. padding) -> q, k, v [B,H,Tp,D] bf16 (q, k through the
    feature map ``elu + 1``; steps T.. zero). Gradient: [M, 3*H*D] in qkv's dtype, padding rows
    zero."""

    @staticmethod
    def forward(ctx, qkv: Tensor, B: int, T: int, Tp: int, H: int, D: int):
        src = _first(qkv, 0, B * T).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # [3,B,H,T,D]
        buf = qkv.new_empty(3, B, H, Tp, D, dtype=KERNEL_DTYPE)
        _zero_tail(buf, 3, T)  # padded steps: finite (they write nothing: w = 0)
        dst = _first(buf, 3, T)
        # phi in fp32, rounded once into the kernel's layout (what elu(x.float()) + 1 then
        # .to(bf16) computed, without its two intermediate tensors and the transposing copies)
        f = torch.nn.functional.elu(src.narrow(0, 0, 2).float())  # [2,B,H,T,D] fp32
        torch.add(f, 1.0, out=dst.narrow(0, 0, 2))
        dst.select(0, 2).copy_(src.select(0, 2))
        ctx.save_for_backward(qkv)
        ctx.dims = (B, T, H, D)
        return buf.unbind(0)

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        (qkv,) = ctx.saved_tensors
        B, T, H, D = ctx.dims
        n = B * T
        dqkv = qkv.new_empty(qkv.shape)
        _zero_tail(dqkv, 0, n)
        dst = _first(dqkv, 0, n).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        src = _first(qkv, 0, n).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
        x = src.narrow(0, 0, 2).float().unbind(0)  # the feature map's input, [B,H,T,D] each
        for i, d in enumerate((dq, dk)):
            if d is None:
                dst[i].zero_()
            else:  # elu's own backward (grad * exp(x) for x <= 0, grad above) in fp32, one
                # rounding into dqkv's dtype: the values of the widen / elu / cast-back chain
                torch.ops.aten.elu_backward.grad_input(_first(d, 2, T), 1.0, 1.0, 1.0, False,
                                                       x[i], grad_input=dst[i])
        if dv is None:
            dst[2].zero_()
        else:
            dst[2].copy_(_first(dv, 2, T))
        return dqkv, None, None, None, None, None


class KernelRows(torch.autograd.Function):
    """o [B,H,Tp,E] (steps T.. dropped) -> rows [M >= B*T, H*E] (rows B*T.. zero), one copy;
    the gradient goes back the same way into a [B,H,Tp,E] tensor (steps T.. zero)."""

    @staticmethod
    def forward(ctx, o: Tensor, T: int, M: int):
        B, H, Tp, E = o.shape
        out = o.new_empty(M, H * E)
        _zero_tail(out, 0, B * T)
        _first(out, 0, B * T).view(B, T, H, E).copy_(_first(o, 2, T).transpose(1, 2))
        ctx.dims = (B, H, T, Tp, E)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        B, H, T, Tp, E = ctx.dims
        do = grad.new_empty(B, H, Tp, E)
        _zero_tail(do, 2, T)  # outputs of padded steps were dropped: no gradient
        _first(do, 2, T).copy_(_first(grad, 0, B * T).reshape(B, T, H, E).transpose(1, 2))
        return do, None, None


class KernelRowsPacked(torch.autograd.Function):
    """o [B,H,Tp,E] -> packed rows [M >= n, H*E] (:mod:`.rows`; rows n.. zero): one gather of
    each (row, head)'s E values (``idx``, :func:`~.rows.head_index`); the gradient goes back by
    one scatter into a zero [B,H,Tp,E] (padding steps get none)."""

    @staticmethod
    def forward(ctx, o: Tensor, idx: Tensor, n: int, M: int):
        B, H, Tp, E = o.shape
        out = o.new_empty(M, H * E)
        torch.index_select(o.reshape(-1, E), 0, idx, out=out[:n].view(n * H, E))
        _zero_tail(out, 0, n)
        ctx.save_for_backward(idx)
        ctx.dims = (B, H, Tp, E, n)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        (idx,) = ctx.saved_tensors
        B, H, Tp, E, n = ctx.dims
        do = grad.new_zeros(B, H, Tp, E)
        do.view(-1, E).index_copy_(0, idx, grad[:n].reshape(n * H, E))
        return do, None, None, None


class KernelGates(torch.autograd.Function):
    """sel [M >= B*T, 2*H*N + H] (read logits, write logits, retention logits; rows B*T..
    padding), mask [B,T] bool or None -> r, w [B,H,Tp,N], g [B,H,Tp] fp32 in the kernels'
    layout: r, w softmaxes (w zero on masked steps), g = sigmoid clamped to >= 1e-6 (a =
    1 - w (1 - g) >= g keeps log a finite); steps T.. write nothing (w = 0, g = 1). Gradient:
    [M, 2*H*N + H] in sel's dtype (padding rows zero), rounded once from fp32."""

    @staticmethod
    def forward(ctx, sel: Tensor, mask: Tensor | None, B: int, T: int, Tp: int, H: int, N: int):
        # one widening (softmax's dtype= casts too: on CUDA in one pass with it for fp16 only)
        s = _first(sel, 0, B * T).float().view(B, T, -1)
        sr, sw, sg = s.split([H * N, H * N, H], -1)
        rw = sel.new_empty(2, B, H, Tp, N, dtype=torch.float32)
        g = sel.new_empty(B, H, Tp, dtype=torch.float32)
        _zero_tail(rw, 3, T)
        _zero_tail(g, 2, T, 1.0)
        rt, wt = _first(rw, 3, T).unbind(0)  # [B,H,T,N]
        r = sr.view(B, T, H, N).softmax(-1)  # [B,T,H,N]
        w = sw.view(B, T, H, N).softmax(-1)
        rt.copy_(r.transpose(1, 2))
        if mask is None:
            wt.copy_(w.transpose(1, 2))
        else:  # padded steps write nothing
            torch.mul(w, mask.reshape(B, T, 1, 1), out=wt.transpose(1, 2))
        sg = torch.sigmoid(sg)  # [B,T,H] (not in place: s may be sel itself)
        torch.clamp(sg, min=1e-6, out=_first(g, 2, T).transpose(1, 2))
        ctx.save_for_backward(sel, mask, r, w, sg)
        ctx.dims = (B, T, H, N)
        return (*rw.unbind(0), g)

    @staticmethod
    def backward(ctx, dr: Tensor | None, dw: Tensor | None, dg: Tensor | None):
        sel, mask, r, w, sg = ctx.saved_tensors
        B, T, H, N = ctx.dims
        dsel = sel.new_empty(sel.shape)
        _zero_tail(dsel, 0, B * T)
        dsr, dsw, dsg = _first(dsel, 0, B * T).view(B, T, -1).split([H * N, H * N, H], -1)
        sb = torch.ops.aten._softmax_backward_data
        if dr is None:
            dsr.zero_()
        else:
            dsr.view(B, T, H, N).copy_(sb(_first(dr, 2, T).transpose(1, 2), r, -1,
                                          torch.float32))
        if dw is None:
            dsw.zero_()
        else:
            d = _first(dw, 2, T).transpose(1, 2)
            d = d if mask is None else d * mask.reshape(B, T, 1, 1)
            dsw.view(B, T, H, N).copy_(sb(d, w, -1, torch.float32))
        if dg is None:
            dsg.zero_()
        else:  # the clamp passes the gradient where sigmoid >= 1e-6 (as clamp's backward)
            d = torch.where(sg >= 1e-6, _first(dg, 2, T).transpose(1, 2), 0.0)
            torch.ops.aten.sigmoid_backward.grad_input(d, sg, grad_input=dsg)
        return dsel, None, None, None, None, None, None
