"""The kernels' layout in one pass (attention_io): same values and gradients, fewer copies.

On the CPU there are no kernels: the kernel wrapper (banked_attention_triton: padding, slicing)
runs with the PyTorch reference as its kernel, so both routes below compute the same function
and differ only in how q, k, v, r, w, g reach the kernel and how o comes back."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from blocklm.model import attention, attention_io, banked_triton
from blocklm.model.attention import BankedAttention
from blocklm.model.attention_io import KernelGates, KernelQKV, KernelRows
from blocklm.model.config import AttentionConfig

# ops that only move or convert data (on CUDA: copy, cast, fill and strided-copy kernels)
MOVES = {"_to_copy", "copy_", "clone", "constant_pad_nd", "slice_backward", "cat", "stack",
         "zero_", "fill_", "zeros", "zeros_like", "new_zeros", "select_backward"}


class RefKernel:
    """Stands in for BankedAttentionFn: the PyTorch reference on the wrapper's padded inputs."""

    launches_first = False
    uncounted = [False]  # the reference's own ops (forward and backward) are not the layer's

    @staticmethod
    def apply(q, k, v, r, w, g, S0, z0, eps, C, R):
        q, k, v, r, w, g = _Counted.apply(q, k, v, r, w, g)
        RefKernel.uncounted[0] = True
        try:
            o, S, z = banked_triton.banked_attention_reference(q, k, v, r, w, g, S0, z0, eps, C)
        finally:
            RefKernel.uncounted[0] = False
        return _Uncounted.apply(o.to(v.dtype)), S, z


class _Counted(torch.autograd.Function):
    """Marks where the reference's backward ends (its inputs' gradients are complete)."""

    @staticmethod
    def forward(ctx, *xs):
        return tuple(x.view_as(x) for x in xs)

    @staticmethod
    def backward(ctx, *gs):
        RefKernel.uncounted[0] = False
        return gs


class _Uncounted(torch.autograd.Function):
    """Marks where the reference's backward starts (its ops run after this node's)."""

    @staticmethod
    def forward(ctx, o):
        return o.view_as(o)

    @staticmethod
    def backward(ctx, g):
        RefKernel.uncounted[0] = True
        return g


def old_forward(att, x, S, z, mask=None, bt=None):
    """The layer's kernel route before attention_io (HEAD 074f039): _project, casts in _mix,
    the wrapper's pads, a slice, a transposing reshape and a pad for the rows."""
    q, k, v, r, w, g = att._project(x, mask, bt)
    B, H, T, D = q.shape
    with torch.autocast(device_type=x.device.type, enabled=False):
        lp = attention_io.KERNEL_DTYPE
        o, S, z = banked_triton.banked_attention_triton(q.to(lp), k.to(lp), v.to(lp), r, w, g,
                                                        S, z, att.cfg.eps, att.cfg.chunk)
    o = o.transpose(1, 2).reshape(B, T, H * D)
    if bt is not None:
        o = F.pad(o.reshape(B * T, H * D), (0, 0, 0, x.shape[0] - B * T))
    return att.out(o.to(x.dtype)), S, z


class OpCount(TorchDispatchMode):
    """Counts the ops ``keep(func, args, out)`` selects and the bytes they write."""

    def __init__(self, keep) -> None:
        super().__init__()
        self.keep, self.n, self.bytes = keep, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.keep(func, args, out):
            self.n += 1
            self.bytes += out.numel() * out.element_size()
        return out


def Moves() -> OpCount:
    """Data-movement ops outside the reference kernel."""
    return OpCount(lambda func, args, out: func.overloadpacket.__name__ in MOVES
                   and not RefKernel.uncounted[0])


def _setup(monkeypatch, memory=True, rows=True):
    monkeypatch.setattr(banked_triton, "BankedAttentionFn", RefKernel)
    monkeypatch.setattr(attention, "kernel_path", lambda q, v, chunk: True)
    torch.manual_seed(0)
    att = BankedAttention(AttentionConfig(heads=2, head_dim=16, banks=3, chunk=16), 24)
    B, T = 3, 21  # two kernel blocks of 16 steps: 11 padded steps
    M = 70 if rows else B * T
    x = torch.randn(M, 24, requires_grad=True) if rows else \
        torch.randn(B, T, 24, requires_grad=True)
    S = torch.rand(B, 2, 3, 16, 16, requires_grad=True) if memory else None
    z = torch.rand(B, 2, 3, 16, requires_grad=True) if memory else None
    mask = torch.arange(T)[None, :] < torch.tensor([[21], [13], [4]])
    return att, (x, S, z, mask, (B, T) if rows else None)


def _run(fn, att, x, S, z, mask, bt, autocast=True):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):  # x * 1: not a leaf, as in the model
        y, S1, z1 = fn(att, x * 1, S, z, mask, bt)  # (autocast caches a leaf's cast)
    loss = y.float().square().sum() + S1.square().sum() + z1.sum()
    leaves = [t for t in (x, S, z) if t is not None] + list(att.parameters())
    return [y, S1, z1] + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("memory,rows,autocast", [(True, True, True), (False, True, True),
                                                   (True, False, True), (True, True, False)])
def test_kernel_route_matches_the_op_chain(monkeypatch, memory, rows, autocast):
    """Output, memories and every gradient equal those of the op chain it replaces (padded
    rows and steps, a mask, with and without incoming memory, [B,T,d] or row input, bf16
    autocast or fp32 projections)."""
    att, args = _setup(monkeypatch, memory, rows)
    new = _run(BankedAttention.forward, att, *args, autocast=autocast)
    old = _run(old_forward, att, *args, autocast=autocast)
    assert new[0].shape == old[0].shape
    assert torch.equal(new[0], old[0])  # same bf16 operands, same kernel: same bits
    for a, b in zip(new[1:], old[1:]):  # fp32 sums may add in another order
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_kernel_route_moves_less(monkeypatch):
    """Forward + backward of one layer's attention on the kernel route: fewer copies, casts
    and fills, and fewer bytes written by them, than the op chain (here 55 -> 40 ops, 251 ->
    152 KB; the weights' casts, the same on both routes, included)."""
    att, args = _setup(monkeypatch)
    with Moves() as new:
        _run(BankedAttention.forward, att, *args)
    with Moves() as old:
        _run(old_forward, att, *args)
    print("moves", old.n, "->", new.n, "bytes", old.bytes, "->", new.bytes)
    assert new.n <= old.n - 15
    assert new.bytes <= old.bytes - 95_000


def test_layouts_and_padding():
    """q, k, v come out contiguous bf16 [B,H,Tp,D], padded steps zero; the rows' padding is
    zero and their gradients reach only real rows and steps."""
    B, T, Tp, H, D, M = 2, 5, 8, 3, 4, 13
    qkv = torch.randn(M, 3 * H * D, requires_grad=True)
    q, k, v = KernelQKV.apply(qkv, B, T, Tp, H, D)
    for t in (q, k, v):
        assert t.shape == (B, H, Tp, D) and t.is_contiguous() and t.dtype == torch.bfloat16
        assert not t[:, :, T:].any()
    want = qkv[:B * T].detach().view(B, T, 3, H, D)[:, :, 2].transpose(1, 2)
    assert torch.equal(v[:, :, :T], want.to(torch.bfloat16))
    o = torch.randn(B, H, Tp, D, requires_grad=True)
    rows = KernelRows.apply(o, T, M)
    assert rows.shape == (M, H * D) and not rows[B * T:].any()
    (q.float().sum() + rows.square().sum()).backward()
    assert not qkv.grad[B * T:].any() and not o.grad[:, :, T:].any()
    assert torch.equal(o.grad[:, :, :T], 2 * o.detach()[:, :, :T])


def test_gates_layout_and_masked_steps():
    """r, w, g come out contiguous [B,H,Tp,.] fp32; padded steps write nothing (w = 0, g = 1),
    masked steps neither (w = 0); r and w sum to one elsewhere; padding rows get no gradient."""
    B, T, Tp, H, N, M = 2, 5, 8, 3, 4, 13
    sel = torch.randn(M, 2 * H * N + H, requires_grad=True)
    mask = torch.arange(T)[None, :] < torch.tensor([[5], [2]])
    r, w, g = KernelGates.apply(sel, mask, B, T, Tp, H, N)
    for t in (r, w, g):
        assert t.is_contiguous() and t.dtype == torch.float32 and t.shape[:3] == (B, H, Tp)
    assert not w[:, :, T:].any() and torch.equal(g[:, :, T:], torch.ones(B, H, Tp - T))
    assert not w[1, :, 2:].any() and torch.allclose(w[0, :, :T].sum(-1), torch.ones(H, T))
    assert torch.allclose(r[:, :, :T].sum(-1), torch.ones(B, H, T)) and bool((g >= 1e-6).all())
    (r.sum() + w.square().sum() + g.sum()).backward()
    assert not sel.grad[B * T:].any() and sel.grad[:B * T].abs().sum() > 0


_INTERP = """
from blocklm.model import attention
from blocklm.model.attention import BankedAttention
from blocklm.model.config import AttentionConfig
from test_attention_io import old_forward, _run
from blocklm.model import attention_io
attention.kernel_path = lambda q, v, chunk: True  # CPU tensors through the real kernels
attention_io.KERNEL_DTYPE = torch.float32  # the interpreter has no bf16
torch.manual_seed(0)
att = BankedAttention(AttentionConfig(heads=2, head_dim=16, banks=3, chunk=16), 24)
B, T, M = 3, 21, 70
x = torch.randn(M, 24, requires_grad=True)
S = torch.rand(B, 2, 3, 16, 16, requires_grad=True)
z = torch.rand(B, 2, 3, 16, requires_grad=True)
mask = torch.arange(T)[None, :] < torch.tensor([[21], [13], [4]])
new = _run(BankedAttention.forward, att, x, S, z, mask, (B, T), autocast=False)
old = _run(old_forward, att, x, S, z, mask, (B, T), autocast=False)
assert torch.equal(new[0], old[0])
for a, b in zip(new[1:], old[1:]):
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
print("ok")
"""


@pytest.mark.slow
def test_kernel_route_through_the_real_kernels_under_the_interpreter():
    """The real BankedAttentionFn (launch_first, saved inputs that are views of one buffer,
    its own backward) under ``TRITON_INTERPRET=1`` (fp32 operands: the interpreter has no
    bf16): the same output bits and gradients as the op chain through the same kernels."""
    pytest.importorskip("triton")
    from .test_banked_triton import run_interpreted

    assert run_interpreted(_INTERP.replace("{", "{{").replace("}", "}}")).strip() == "ok"
