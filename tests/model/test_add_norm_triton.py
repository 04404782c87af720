"""The layer's end as one kernel each way (model/add_norm_triton.py): the PyTorch reference is
the eager layer end, the decoder through it equals the plain layers (values, states, every
gradient), and the Triton kernels match the reference on CUDA and under Triton's interpreter."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from blocklm.model.add_norm_triton import (
    HAS_TRITON,
    add_norm,
    add_norm_triton_ok,
)
from blocklm.model.decoder import Decoder

# (test_decoder's cfg is imported inside the tests: the interpreter test runs this file as a
# top-level module, where a relative import fails)

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                          reason="needs CUDA and Triton")


def test_reference_is_the_eager_layer_end():
    """norm(x + ff2(h)) of the eager layer, the bias added in the sum, fp64."""
    torch.manual_seed(0)
    x, h = torch.randn(9, 12, dtype=torch.float64), torch.randn(9, 20, dtype=torch.float64)
    ff2 = torch.nn.Linear(20, 12).double()
    w = torch.rand(12, dtype=torch.float64) + 0.5
    want = F.rms_norm(x + ff2(h), (12,), w)  # eps None: the dtype's, as nn.RMSNorm
    y, yl = add_norm(x, F.linear(h, ff2.weight), ff2.bias, w, None, torch.float32)
    torch.testing.assert_close(y, want, rtol=1e-14, atol=1e-14)
    assert yl.dtype == torch.float32
    torch.testing.assert_close(yl, want.float())


def test_cpu_operands_take_the_reference():
    x = torch.zeros(4, 8)
    assert not add_norm_triton_ok(x, x)


@pytest.mark.parametrize("case", ["x", "f"])
def test_kernels_forced_on_operands_they_do_not_serve_are_refused(case):
    x = torch.zeros(4, 8)
    bad = torch.zeros(8, 4).t()  # columns of stride 4
    xs, fs = (bad, None) if case == "x" else (x, bad)
    why = (f"{case} must be rows" + (" [M, D <= 8192]" if case == "x" else " of x's shape")
           if HAS_TRITON else "Triton is not installed")
    with pytest.raises(ValueError, match=r"add_norm's kernels: " + re.escape(why)):
        add_norm(xs, fs, None, torch.ones(8), None, torch.float32, kernel=True)


def test_unknown_add_norm_form_is_refused():
    from .test_decoder import cfg

    dec = Decoder(cfg(stack=False))
    dec.add_norm = "kernels"
    with pytest.raises(ValueError, match="Decoder.add_norm is 'kernels'"):
        dec(torch.randn(2, 3, 16), dec.initial_state(2))


@pytest.mark.parametrize("packed", [False, True])
def test_decoder_through_add_norm_equals_the_plain_layers(packed):
    """forward_pair (the reference as the layers' end) against forward: outputs, state and
    every gradient, fp64 with the stack, on the row grid or on packed rows."""
    from .test_decoder import cfg
    from .test_rows import decoder_runs, fp64_block_batch

    torch.manual_seed(0)
    dec = Decoder(cfg()).double()
    dec.grid_rows, dec.packed_rows = True, packed
    lengths, mask, x, state = fp64_block_batch(dec)
    calls = []
    for layer in dec.layers:
        for norm in (layer.norm_core, layer.norm):
            norm.register_forward_hook(lambda m, i, o: calls.append("norm"))
    (h0, s0, g0, n0), (h1, s1, g1, n1) = decoder_runs(dec, x, state, mask, lengths, calls,
                                                      "add_norm", ("off", "reference"))
    assert len(n0) == 2 * len(dec.layers) and n1 == []  # the pair path ran no norm module
    torch.testing.assert_close(h1, h0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decoder_on_the_cpu_keeps_the_plain_layers_unless_told():
    from .test_decoder import cfg

    dec = Decoder(cfg(stack=False))
    dec.cfg.fused_add_norm = True  # the kernels only: the CPU keeps the plain layers
    assert dec._pair_form(torch.zeros(4, 16), True) is None
    dec.add_norm = "reference"
    assert dec._pair_form(torch.zeros(4, 16), True) == "reference"


def add_norm_errors(device: str, fdtype, M: int = 37, D: int = 48, bias: bool = True,
                    drop: tuple = (), xdtype=torch.float32, low=None) -> tuple[float, float]:
    """Max errors of AddNormTriton against the reference (forward: both outputs, relative to
    the output's scale; backward: the gradients of x, f, bias and weight) on fresh random
    operands. ``fdtype`` None: no f (a plain norm); ``low`` None: f's dtype (x's without f);
    ``drop``: outputs (0: y, 1: yl) that get no gradient."""
    torch.manual_seed(M * 7 + D)
    low = low or fdtype or xdtype
    x0 = torch.randn(M, D, device=device).to(xdtype)
    f0 = None if fdtype is None else torch.randn(M, D, device=device).to(fdtype)
    b0 = torch.randn(D, device=device) if bias else None
    w0 = torch.rand(D, device=device) + 0.5
    ups = [torch.randn(M, D, device=device).to(xdtype), torch.randn(M, D, device=device).to(low)]
    outs = []
    for kernel in (True, False):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x0, f0, w0, b0)
                  if t is not None]
        x, w = leaves[0], leaves[1 + (f0 is not None)]
        f = leaves[1] if f0 is not None else None
        b = leaves[-1] if b0 is not None else None
        y, yl = add_norm(x, f, b, w, 1e-6, low, kernel)
        assert y.dtype == xdtype and yl.dtype == low and (yl is y) == (low == xdtype)
        outs_used = (y,) if yl is y else (y, yl)
        loss = sum((o.float() * u.float()).sum() for i, (o, u) in enumerate(zip(outs_used, ups))
                   if i not in drop)
        gs = torch.autograd.grad(loss, leaves)
        outs.append(((y.float(), yl.float()), [g.float() for g in gs]))
    (a, ga), (r, gr) = outs
    ev = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(a, r))
    eg = max(((p - q).abs().max() / q.abs().max().clamp(min=1e-12)).item()
             for p, q in zip(ga, gr))
    return ev, eg


BF = torch.bfloat16
# (x, f, low): the fp32 stream with a bf16 feed-forward (text), the bf16 stream (image, audio),
# a plain norm of a bf16 row (the core's), everything fp32
DTYPES = [(torch.float32, BF, BF), (BF, BF, BF), (BF, None, BF),
          (torch.float32, torch.float32, torch.float32)]


@cuda
@pytest.mark.parametrize("M,D", [(37, 48), (1000, 768), (5, 768), (4099, 384)])
@pytest.mark.parametrize("xdtype,fdtype,low", DTYPES)
def test_kernels_match_the_reference(M, D, xdtype, fdtype, low):
    ev, eg = add_norm_errors("cuda", fdtype, M, D, xdtype=xdtype, low=low)
    # fp32 arithmetic on both sides; bf16 outputs and gradients rounded once (2^-8 relative)
    tol = 2 ** -7 if BF in (xdtype, fdtype) else 1e-5
    assert ev < tol and eg < tol, (ev, eg)


@cuda
@pytest.mark.parametrize("drop", [(0,), (1,)])
def test_kernels_take_one_missing_gradient(drop):
    ev, eg = add_norm_errors("cuda", torch.float32, 300, 768, bias=False, drop=drop,
                             low=torch.float16)
    assert ev < 2 ** -9 and eg < 1e-5, (ev, eg)


@cuda
@pytest.mark.parametrize("stream", [torch.float32, BF])
def test_decoder_kernels_on_cuda_are_as_close_to_fp32_as_the_plain_layers(stream):
    """The decoder on CUDA under bf16 autocast, with the kernels' norms and without, each
    against the same decoder in fp32 (autocast off): the kernels' outputs, state and every
    gradient are no further from fp32 than the plain layers' (some gradients, such as the
    stack's output projection's, are mostly bf16 noise either way). ``stream``: the input's
    dtype under autocast (text embeds in fp32, the linear embeddings of images and audio give
    bf16)."""
    from .test_decoder import cfg

    torch.manual_seed(0)
    dec = Decoder(cfg()).cuda()
    dec.cfg.fused_add_norm = True  # opt-in
    B, T, lengths = 3, 40, [40, 9, 23]
    mask = torch.arange(T, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]
    x = torch.randn(B, T, 16, device="cuda", requires_grad=True)
    state = dec.initial_state(B, "cuda").requires_grad_(True)
    res = {}
    for mode, bf16 in (("off", False), ("off", True), (None, True)):
        dec.add_norm = mode
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            h, s = dec(x.to(stream) if bf16 else x, state, mask, lengths=lengths)
        loss = h[mask].float().square().sum() + s.square().sum()
        res[mode, bf16] = [h[mask].float(), s] + list(
            torch.autograd.grad(loss, [x] + list(dec.parameters())))
    assert dec._pair_form(torch.zeros(2, 16, device="cuda"), True) == "auto"
    ref, plain, kern = res["off", False], res["off", True], res[None, True]
    for r, p, k in zip(ref, plain, kern):
        ep, ek = ((p - r).norm() / r.norm()).item(), ((k - r).norm() / r.norm()).item()
        assert ek <= 1.5 * ep + 1e-2, (ep, ek)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_match_under_triton_interpreter():
    """The same in fp32 through the kernels on the CPU (``TRITON_INTERPRET=1``): several row
    blocks per program, a last block past M, no bias, one output without a gradient."""
    from .test_banked_triton import run_interpreted

    out = run_interpreted("""
from test_add_norm_triton import add_norm_errors
for M, D, bias, drop in ((37, 48, True, ()), (200, 96, True, ()), (3, 48, False, ()),
                         (90, 40, True, (0,)), (90, 40, True, (1,))):
    ev, eg = add_norm_errors("cpu", torch.float32, M, D, bias, drop, low=torch.float16)
    assert ev < 2 ** -10 and eg < 1e-5, (M, D, bias, drop, ev, eg)
ev, eg = add_norm_errors("cpu", torch.float32, 40, 48)
assert ev < 1e-6 and eg < 1e-5, (ev, eg)
for x, f, low in ((torch.float32, torch.bfloat16, torch.bfloat16),
                  (torch.bfloat16, torch.bfloat16, torch.bfloat16),
                  (torch.bfloat16, None, torch.bfloat16)):
    ev, eg = add_norm_errors("cpu", f, 64, 48, xdtype=x, low=low)
    assert ev < 2 ** -7 and eg < 2 ** -7, (x, f, ev, eg)
print("ok")
""")
    assert "ok" in out

