"""Fused Triton kernels for the stack's per-iteration work (``StackConfig.fused``, CUDA).

Each ponder iteration of :meth:`blocklm.model.stack.ProcessingStack.ponder` does two things to
the whole stack ([B,K,W] cells, [B,K] strengths) around the controller's three small matmuls:

* read: ``above = cumsum(s) - s``, ``weight = min(s, relu(1 - above))``, ``read = sum_k weight V``;
* update: pop (``new = relu(s - relu(pop - above))``, ``popped = s - new``), accumulate
  (``acc += sum_k popped V``, ``left += sum_k popped``), push (shift in ``v`` with strength
  ``push`` when ``push > 0``).

Eagerly that is ~20 kernels forward and ~40 backward per iteration, with [B,K,W] temporaries
(the products, ``cat`` and ``where`` copies and their gradients): ~300 passes over a [B,K,W]
tensor per decoder step (GPU_NOTES.md, call S1). Here each is one kernel forward and one
backward, one program per example holding its [K,W] tile: the read reads V once, the update
reads V once and writes the pushed V once (a shifted store, no shuffle). The backward kernels
recompute the strengths' small [K] work and follow PyTorch's derivatives exactly, ties
included (``minimum`` splits the gradient in half where both sides are equal; ``relu`` passes
it only where its input is > 0). Same mathematics: tests/model/test_stack_fused.py compares
with the eager ops (Triton's interpreter on the CPU, the kernels on the GPU).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import upcast

try:  # optional: CPU machines (and CI) have no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    @triton.jit
    def _tile(V, S, b, K, W, BK: tl.constexpr, BW: tl.constexpr):
        # example b's cells: indices k [BK], strengths s [BK], the mass above each cell, lanes
        # w [BW], the masks and its cells v [BK, BW] (every kernel below starts here)
        k = tl.arange(0, BK)
        s = tl.load(S + b * K + k, mask=k < K, other=0.0)
        w = tl.arange(0, BW)
        mk, mw = k < K, w < W
        m = mk[:, None] & mw[None, :]
        v = tl.load(V + b * K * W + k[:, None] * W + w[None, :], mask=m, other=0.0)
        return k, s, tl.cumsum(s, 0) - s, w, mk, mw, m, v

    @triton.jit
    def _read_fwd(V, S, R, K, W, BK: tl.constexpr, BW: tl.constexpr):
        b = tl.program_id(0)
        k, s, above, w, mk, mw, m, v = _tile(V, S, b, K, W, BK, BW)
        wt = tl.minimum(s, tl.maximum(1.0 - above, 0.0))
        tl.store(R + b * W + w, tl.sum(wt[:, None] * v, 0), mask=mw)

    @triton.jit
    def _read_bwd(V, S, GR, GV, GS, K, W, BK: tl.constexpr, BW: tl.constexpr):
        b = tl.program_id(0)
        k, s, above, w, mk, mw, m, v = _tile(V, S, b, K, W, BK, BW)
        g = tl.load(GR + b * W + w, mask=mw, other=0.0)
        q = 1.0 - above
        r = tl.maximum(q, 0.0)
        wt = tl.minimum(s, r)
        tl.store(GV + b * K * W + k[:, None] * W + w[None, :], wt[:, None] * g[None, :], mask=m)
        gw = tl.sum(v * g[None, :], 1)
        gs = tl.where(s < r, gw, tl.where(s == r, gw * 0.5, 0.0))
        gr = tl.where(r < s, gw, tl.where(s == r, gw * 0.5, 0.0))
        ga = -tl.where(q > 0.0, gr, 0.0)  # d/d above
        gs += tl.sum(ga, 0) - tl.cumsum(ga, 0)  # above_j = sum_{i<j} s_i
        tl.store(GS + b * K + k, gs, mask=mk)

    @triton.jit
    def _update_fwd(V, S, POP, PUSH, VN, ACC, LEFT, VO, SO, ACCO, LEFTO, K, W,
                    BK: tl.constexpr, BW: tl.constexpr):
        b = tl.program_id(0)
        k, s, above, w, mk, mw, m, v = _tile(V, S, b, K, W, BK, BW)
        u = tl.load(POP + b)
        d = tl.load(PUSH + b)
        new = tl.maximum(s - tl.maximum(u - above, 0.0), 0.0)
        popped = s - new
        acc = tl.load(ACC + b * W + w, mask=mw, other=0.0) + tl.sum(popped[:, None] * v, 0)
        tl.store(ACCO + b * W + w, acc, mask=mw)
        tl.store(LEFTO + b, tl.load(LEFT + b) + tl.sum(popped, 0))
        off = (d > 0).to(tl.int32)  # a push of exactly 0 (padding, halted) keeps the cells
        dst = k + off  # the shifted store: cell k goes to k+1 on a push, the bottom falls off
        tl.store(SO + b * K + dst, new, mask=mk & (dst < K))
        tl.store(VO + b * K * W + dst[:, None] * W + w[None, :], v, mask=m & (dst < K)[:, None])
        top = off > 0
        tl.store(SO + b * K, d, mask=top)
        vn = tl.load(VN + b * W + w, mask=mw, other=0.0)
        tl.store(VO + b * K * W + w, vn, mask=mw & top)

    @triton.jit
    def _update_bwd(V, S, POP, PUSH, GVO, GSO, GACC, GLEFT, GV, GS, GPOP, GPUSH, GVN, K, W,
                    BK: tl.constexpr, BW: tl.constexpr):
        b = tl.program_id(0)
        k, s, above, w, mk, mw, m, v = _tile(V, S, b, K, W, BK, BW)
        u = tl.load(POP + b)
        d = tl.load(PUSH + b)
        a = u - above
        z = s - tl.maximum(a, 0.0)
        new = tl.maximum(z, 0.0)
        popped = s - new
        off = (d > 0).to(tl.int32)
        src = k + off  # where cell k went
        gnew = tl.load(GSO + b * K + src, mask=mk & (src < K), other=0.0)
        gv = tl.load(GVO + b * K * W + src[:, None] * W + w[None, :],
                     mask=m & (src < K)[:, None], other=0.0)
        top = off > 0
        tl.store(GPUSH + b, tl.where(top, tl.load(GSO + b * K), 0.0))
        gvn = tl.load(GVO + b * K * W + w, mask=mw, other=0.0)
        tl.store(GVN + b * W + w, tl.where(top, gvn, 0.0), mask=mw)
        gacc = tl.load(GACC + b * W + w, mask=mw, other=0.0)
        tl.store(GV + b * K * W + k[:, None] * W + w[None, :],
                 gv + popped[:, None] * gacc[None, :], mask=m)
        gp = tl.sum(v * gacc[None, :], 1) + tl.load(GLEFT + b)  # d/d popped
        gnew -= gp
        gz = tl.where(z > 0.0, gnew, 0.0)
        ga = tl.where(a > 0.0, -gz, 0.0)  # d/d (pop - above)
        tl.store(GPOP + b, tl.sum(tl.where(mk, ga, 0.0), 0))
        gs = gp + gz
        gab = -ga
        gs += tl.sum(gab, 0) - tl.cumsum(gab, 0)
        tl.store(GS + b * K + k, gs, mask=mk)


def _blocks(V: Tensor) -> dict:
    K, W = V.shape[1], V.shape[2]
    BK, BW = triton.next_power_of_2(K), triton.next_power_of_2(W)
    return dict(K=K, W=W, BK=BK, BW=BW, num_warps=8 if BK * BW >= 8192 else 4)


class _Read(torch.autograd.Function):
    @staticmethod
    def forward(ctx, V, s):
        V, s = V.contiguous(), s.contiguous()
        out = V.new_empty(V.shape[0], V.shape[2])
        _read_fwd[(V.shape[0],)](V, s, out, **_blocks(V))
        ctx.save_for_backward(V, s)
        return out

    @staticmethod
    def backward(ctx, g):
        V, s = ctx.saved_tensors
        gV, gs = torch.empty_like(V), torch.empty_like(s)
        _read_bwd[(V.shape[0],)](V, s, g.contiguous(), gV, gs, **_blocks(V))
        return gV, gs


class _Update(torch.autograd.Function):
    @staticmethod
    def forward(ctx, V, s, pop, push, vnew, acc, left):
        V, s, vnew = V.contiguous(), s.contiguous(), vnew.contiguous()
        pop, push, acc, left = pop.contiguous(), push.contiguous(), acc.contiguous(), \
            left.contiguous()
        Vo, so, acco, lefto = (torch.empty_like(t) for t in (V, s, acc, left))
        _update_fwd[(V.shape[0],)](V, s, pop, push, vnew, acc, left, Vo, so, acco, lefto,
                                   **_blocks(V))
        ctx.save_for_backward(V, s, pop, push)
        return Vo, so, acco, lefto

    @staticmethod
    def backward(ctx, gVo, gso, gacc, gleft):
        V, s, pop, push = ctx.saved_tensors
        gV, gs, gpop, gpush = (torch.empty_like(t) for t in (V, s, pop, push))
        gvn = V.new_empty(V.shape[0], V.shape[2])
        gacc, gleft = gacc.contiguous(), gleft.contiguous()
        _update_bwd[(V.shape[0],)](V, s, pop, push, gVo.contiguous(), gso.contiguous(), gacc,
                                   gleft, gV, gs, gpop, gpush, gvn, **_blocks(V))
        return gV, gs, gpop, gpush, gvn, gacc, gleft


def fused_read(V: Tensor, s: Tensor) -> Tensor:
    """:func:`blocklm.model.stack.stack_read` as one kernel. V [B,K,W], s [B,K] fp32 -> [B,W]."""
    return _Read.apply(V, s)


def fused_update(V: Tensor, s: Tensor, pop: Tensor, push: Tensor, v: Tensor, acc: Tensor,
                 left: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Pop ``pop`` [B] units from the top, accumulate what left into ``acc`` [B,W] and ``left``
    [B], then push ``v`` [B,W] with strength ``push`` [B] (none when 0), as one kernel.
    -> new V, new s, acc, left (the ponder loop's stack_pop + accumulate + stack_push)."""
    return _Update.apply(V, s, pop, push, v, acc, left)


def available(t: Tensor) -> bool:
    """Whether the fused kernels can run on ``t`` (CUDA and triton, fp32)."""
    return triton is not None and t.is_cuda and t.dtype == torch.float32


def ponder_fused(stack, e: Tensor, V: Tensor, s: Tensor, running: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:meth:`blocklm.model.stack.ProcessingStack.ponder` as the block path runs it (no stats,
    the controller's actions) with the fused read and update: the same operations in the same
    order. e [B,Hd], V [B,K,W], s [B,K], running [B] -> final read, accumulated output, last e,
    new V, new s."""
    cfg = stack.cfg
    left = s.new_zeros(e.shape[0])  # mass that left through the top in this step
    acc = V.new_zeros(e.shape[0], cfg.width)
    for _ in range(cfg.max_steps):
        read = fused_read(V, s)  # [B,W]
        e_new = torch.tanh(upcast(stack.ctrl(torch.cat([e, read.to(e.dtype)], -1))))
        e = torch.where(running[:, None] > 0, e_new, e)
        p = upcast(stack.act(e_new)).softmax(-1)
        push = p[:, 0] * running
        pop = torch.minimum(p[:, 1] * running, 1.0 - left)  # ACT remainder
        v = torch.tanh(upcast(stack.val(e_new)))
        V, s, acc, left = fused_update(V, s, pop, push, v, acc, left)
        running = running * (left < 1.0 - cfg.epsilon).to(s.dtype)
    return fused_read(V, s), acc, e, V, s
