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


class KernelQKV(torch.autograd.Function):
    """qkv [M >= B*T, 3*H*D] (rows B*T.. padding) -> q, k, v [B,H,Tp,D] bf16 (q, k through the
    feature map ``elu + 1``; steps T.. zero). Gradient: [M, 3*H*D] in qkv's dtype, padding rows
    zero."""

    @staticmethod
    def forward(ctx, qkv: Tensor, B: int, T: int, Tp: int, H: int, D: int):
        src = qkv[:B * T].view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # [3,B,H,T,D] view
        buf = qkv.new_empty(3, B, H, Tp, D, dtype=KERNEL_DTYPE)
        if Tp > T:  # padded steps: finite (they write nothing: w = 0)
            buf[:, :, :, T:].zero_()
        # phi in fp32, rounded once into the kernel's layout (what elu(x.float()) + 1 then
        # .to(bf16) computed, without its two intermediate tensors and the transposing copies)
        f = torch.nn.functional.elu(src[:2].float())  # [2,B,H,T,D] fp32
        torch.add(f, 1.0, out=buf[:2, :, :, :T])
        buf[2, :, :, :T].copy_(src[2])
        ctx.save_for_backward(qkv)
        ctx.dims = (B, T, H, D)
        return buf[0], buf[1], buf[2]

    @staticmethod
    def backward(ctx, dq: Tensor | None, dk: Tensor | None, dv: Tensor | None):
        (qkv,) = ctx.saved_tensors
        B, T, H, D = ctx.dims
        n = B * T
        dqkv = qkv.new_empty(qkv.shape)
        if qkv.shape[0] > n:
            dqkv[n:].zero_()
        dst = dqkv[:n].view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)  # [3,B,H,T,D] view
        x = qkv[:n].view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[:2].float()  # pre-activation
        for i, d in enumerate((dq, dk)):
            if d is None:
                dst[i].zero_()
            else:  # elu's own backward (grad * exp(x) for x <= 0, grad above) in fp32, one
                # rounding into dqkv's dtype: the values of the widen / elu / cast-back chain
                torch.ops.aten.elu_backward.grad_input(d[:, :, :T], 1.0, 1.0, 1.0, False, x[i],
                                                       grad_input=dst[i])
        if dv is None:
            dst[2].zero_()
        else:
            dst[2].copy_(dv[:, :, :T])
        return dqkv, None, None, None, None, None


class KernelRows(torch.autograd.Function):
    """o [B,H,Tp,E] (steps T.. dropped) -> rows [M >= B*T, H*E] (rows B*T.. zero), one copy;
    the gradient goes back the same way into a [B,H,Tp,E] tensor (steps T.. zero)."""

    @staticmethod
    def forward(ctx, o: Tensor, T: int, M: int):
        B, H, Tp, E = o.shape
        out = o.new_empty(M, H * E)
        if M > B * T:
            out[B * T:].zero_()
        out[:B * T].view(B, T, H, E).copy_(o[:, :, :T].transpose(1, 2))
        ctx.dims = (B, H, T, Tp, E)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        B, H, T, Tp, E = ctx.dims
        do = grad.new_empty(B, H, Tp, E)
        if Tp > T:  # outputs of padded steps were dropped: no gradient
            do[:, :, T:].zero_()
        do[:, :, :T].copy_(grad[:B * T].reshape(B, T, H, E).transpose(1, 2))
        return do, None, None


class KernelGates(torch.autograd.Function):
    """sel [M >= B*T, 2*H*N + H] (read logits, write logits, retention logits; rows B*T..
    padding), mask [B,T] bool or None -> r, w [B,H,Tp,N], g [B,H,Tp] fp32 in the kernels'
    layout: r, w softmaxes (w zero on masked steps), g = sigmoid clamped to >= 1e-6 (a =
    1 - w (1 - g) >= g keeps log a finite); steps T.. write nothing (w = 0, g = 1). Gradient:
    [M, 2*H*N + H] in sel's dtype (padding rows zero), rounded once from fp32."""

    @staticmethod
    def forward(ctx, sel: Tensor, mask: Tensor | None, B: int, T: int, Tp: int, H: int, N: int):
        s = sel[:B * T].float().view(B, T, -1)  # one widening (softmax's dtype= casts too,
        # on CUDA for fp16 alone in one pass with the softmax: a cast per slice for bf16)
        rw = sel.new_empty(2, B, H, Tp, N, dtype=torch.float32)
        g = sel.new_empty(B, H, Tp, dtype=torch.float32)
        if Tp > T:
            rw[:, :, :, T:].zero_()
            g[:, :, T:].fill_(1.0)
        r = s[..., :H * N].view(B, T, H, N).softmax(-1)  # [B,T,H,N]
        w = s[..., H * N:2 * H * N].view(B, T, H, N).softmax(-1)
        rw[0, :, :, :T].copy_(r.transpose(1, 2))
        if mask is None:
            rw[1, :, :, :T].copy_(w.transpose(1, 2))
        else:  # padded steps write nothing
            torch.mul(w, mask[:, :, None, None], out=rw[1, :, :, :T].transpose(1, 2))
        sg = torch.sigmoid(s[..., 2 * H * N:])  # [B,T,H] (not in place: s may be sel itself)
        torch.clamp(sg, min=1e-6, out=g[:, :, :T].transpose(1, 2))
        ctx.save_for_backward(sel, mask, r, w, sg)
        ctx.dims = (B, T, H, N)
        return rw[0], rw[1], g

    @staticmethod
    def backward(ctx, dr: Tensor | None, dw: Tensor | None, dg: Tensor | None):
        sel, mask, r, w, sg = ctx.saved_tensors
        B, T, H, N = ctx.dims
        n, HN = B * T, H * N
        dsel = sel.new_empty(sel.shape)
        if sel.shape[0] > n:
            dsel[n:].zero_()
        ds = dsel[:n].view(B, T, -1)
        dsr, dsw = ds[..., :HN].view(B, T, H, N), ds[..., HN:2 * HN].view(B, T, H, N)
        sb = torch.ops.aten._softmax_backward_data
        if dr is None:
            dsr.zero_()
        else:
            dsr.copy_(sb(dr[:, :, :T].transpose(1, 2), r, -1, torch.float32))
        if dw is None:
            dsw.zero_()
        else:
            d = dw[:, :, :T].transpose(1, 2)
            d = d if mask is None else d * mask[:, :, None, None]
            dsw.copy_(sb(d, w, -1, torch.float32))
        if dg is None:
            ds[..., 2 * HN:].zero_()
        else:  # the clamp passes the gradient where sigmoid >= 1e-6 (as clamp's backward)
            d = torch.where(sg >= 1e-6, dg[:, :, :T].transpose(1, 2), 0.0)
            torch.ops.aten.sigmoid_backward.grad_input(d, sg, grad_input=ds[..., 2 * HN:])
        return dsel, None, None, None, None, None, None
