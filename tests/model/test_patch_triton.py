"""The element head's Triton kernels (model/patch_triton.py) against the function the eager and
Inductor paths share (``patch_fused.slice_bits``): bits and the gradients of the input and of
every head parameter, for tiles of one, part of one and several, masked and padded elements,
through PatchSupport's slices. On the CPU through Triton's interpreter in fp32 (fresh process);
on the GPU in bf16 against fp32, with errors the size of the eager bf16 path's. (The
interpreter's process starts with test_banked_triton's prelude: its helpers, a numpy fix.)"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from blocklm.model.audio import AudioSupport
from blocklm.model.config import AudioConfig, ImageConfig
from blocklm.model.image import ImageSupport

from .test_banked_triton import run_interpreted
from .test_patch_fused import _batch, _run, assert_as_close_to_fp32

HAS_TRITON = importlib.util.find_spec("triton") is not None
CUDA = torch.cuda.is_available()

_FUNCTION = """
from blocklm.model.patch_fused import make_slice_bits
from blocklm.model.patch_kernel import HeadKernelOpts, head_bits
torch.manual_seed(0)
V = 256
# rows, elements (one tile; a padded tile; two tiles, the second partial), width, input dims
for M, E, WD, d in [(5, 16, 16, 24), (3, 8, 16, 12), (4, 80, 32, 16)]:
    h = torch.randn(M, d)
    t = torch.randint(0, V, (M, E))
    t[0, :5] = 7  # repeated value rows: their gradients add up
    mk = torch.rand(M, E) > 0.3
    mk[-1] = False  # a padding row: costs nothing, still no gradient trouble
    ps = [torch.randn(WD, d) * 0.3, torch.randn(WD) * 0.1, torch.randn(E, WD) * 0.3,
          torch.randn(E * V, WD) * 0.3, torch.randn(WD, WD) * 0.3, torch.randn(WD) * 0.1,
          torch.randn(V, WD) * 0.3, torch.randn(V) * 0.1]
    outs = []
    kernels = lambda *a: head_bits(*a, lp=None)  # noqa: E731
    # the backward's tiles as long as the forward's (E = 80: 3 tiles of 32 both ways)
    same = lambda *a: head_bits(*a, lp=None, opts=HeadKernelOpts(bwd_tile_max=32))  # noqa: E731
    for f in (make_slice_bits(None), kernels, same):
        hh = h.clone().requires_grad_(True)
        pp = [p.clone().requires_grad_(True) for p in ps]
        b = f(hh, t, mk, *pp)
        (b * torch.arange(1, M + 1)).sum().backward()  # unequal weights per row
        outs.append([b.detach(), hh.grad] + [p.grad for p in pp])
    assert outs[0][0][-1] == 0 and outs[1][0][-1] == 0
    for got in outs[1:]:
        for i, (a, r) in enumerate(zip(got, outs[0])):
            err = ((a - r).norm() / r.norm()).item()
            assert err < 1e-5, (M, E, WD, i, err)
print("ok")
"""

_SUPPORT = """
from test_patch_fused import _support, _batch, _run
for chunk, B, T in [(4, 3, 10), (256, 2, 5)]:  # three slices of 4 steps; one slice
    sup = _support(loss_chunk=chunk)
    batch = _batch(sup, B, T)
    h = torch.randn(B, T, 32, requires_grad=True)
    ref = _run(sup, h, batch, "eager")
    got = _run(sup, h, batch, "triton")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_equal_the_function_under_the_interpreter():
    """fp32: values and every gradient within 1e-5 of ``slice_bits`` (fresh process)."""
    assert "ok" in run_interpreted(_FUNCTION)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_support_slices_through_the_kernels_equal_eager():
    """PatchSupport.bits in the Triton form (slices not checkpointed) equals the eager form."""
    assert "ok" in run_interpreted(_SUPPORT)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_unsupported_widths_and_precisions_say_what_to_set():
    """A width the kernels cannot tile, or a precision they do not run, is refused by name."""
    from blocklm.model.patch_kernel import head_bits

    M, E, WD, V = 2, 4, 24, 256
    args = [torch.randn(M, 8), torch.zeros(M, E, dtype=torch.long),
            torch.ones(M, E, dtype=torch.bool), torch.randn(WD, 8), torch.randn(WD),
            torch.randn(E, WD), torch.randn(E * V, WD), torch.randn(WD, WD), torch.randn(WD),
            torch.randn(V, WD), torch.randn(V)]
    with pytest.raises(ValueError, match="width 24.*fused_head=false"):
        head_bits(*args, lp=None)
    with pytest.raises(ValueError, match="fp32 or bf16"):
        head_bits(*args, lp=torch.float16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_too_many_rows_and_bad_launch_options_are_refused_before_any_launch():
    """2**31 element rows would overflow the backward's int32 row offsets: refused with the
    setting to change, before anything the size of the rows is allocated (the inputs here are
    broadcast views); tile and chunk sizes must be powers of two the tensor cores take."""
    from blocklm.model.patch_kernel import DEFAULT_OPTS, HeadKernelOpts, _HeadBits

    M, E, WD, V = 2**27, 16, 16, 256
    c = torch.zeros(1, WD).expand(M, WD)
    t = torch.zeros(1, E, dtype=torch.long).expand(M, E)
    mk = torch.zeros(1, E, dtype=torch.bool).expand(M, E)
    ws = [torch.zeros(E, WD), torch.zeros(E * V, WD), torch.zeros(WD, WD), torch.zeros(WD),
          torch.zeros(V, WD), torch.zeros(V)]
    with pytest.raises(ValueError, match="2\\*\\*31 element rows.*loss_chunk"):
        _HeadBits.apply(c, t, mk, *ws, False, DEFAULT_OPTS)
    for bad in ({"tile_max": 24}, {"bwd_tile_max": 8}, {"vocab_chunk": 100}):
        with pytest.raises(ValueError, match=f"HeadKernelOpts.{next(iter(bad))}"):
            HeadKernelOpts(**bad)


def test_fused_head_is_the_default_where_the_kernels_run():
    """``fused_head`` (default on since P153: +5.2% mixed training on the H200) picks the kernels
    on CUDA devices with TMA where Triton is installed, for power-of-two widths in fp32 or bf16;
    the CPU stays eager, other devices and widths take the compiled head."""
    img = ImageSupport(ImageConfig(), 32)
    aud = AudioSupport(AudioConfig(), 32)
    assert img.fused_head and aud.fused_head
    assert img._form(torch.empty(0)) == "eager"
    off = ImageSupport(ImageConfig(fused_head=False), 32)
    odd = ImageSupport(ImageConfig(head_width=24), 32)
    if CUDA:
        cuda = torch.empty(0, device="cuda")
        tma = torch.cuda.get_device_capability() >= (9, 0)
        assert img._form(cuda) == ("triton" if HAS_TRITON and tma else "inductor")
        assert off._form(cuda) == "inductor" and odd._form(cuda) == "inductor"
        with torch.autocast("cuda", dtype=torch.float16):
            assert img._form(cuda) == "inductor"


def test_where_the_kernels_run(monkeypatch):
    """:func:`runs_here` without a GPU: the device's capability is asked once, and only for a
    CUDA device; widths the kernels cannot tile and fp16 are refused before it is asked."""
    from blocklm.model import patch_kernel

    asked = []
    monkeypatch.setattr(patch_kernel, "triton", object())
    monkeypatch.setattr(torch.cuda, "get_device_capability",
                        lambda i=None: asked.append(i) or ((9, 0) if i == 0 else (8, 0)))
    patch_kernel._tma.cache_clear()
    try:
        cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
        assert patch_kernel.runs_here(cuda0, 64, torch.bfloat16)
        assert patch_kernel.runs_here(cuda0, 16, None)
        assert not patch_kernel.runs_here(cuda1, 64, torch.bfloat16)  # no TMA (sm80)
        assert not patch_kernel.runs_here(cuda0, 24, torch.bfloat16)
        assert not patch_kernel.runs_here(cuda0, 8, torch.bfloat16)
        assert not patch_kernel.runs_here(cuda0, 64, torch.float16)
        assert not patch_kernel.runs_here(torch.device("cpu"), 64, None)
        monkeypatch.setattr(patch_kernel, "triton", None)
        assert not patch_kernel.runs_here(cuda0, 64, None)
        assert asked == [0, 1]
    finally:
        patch_kernel._tma.cache_clear()


@pytest.mark.gpu
@pytest.mark.skipif(not (CUDA and HAS_TRITON), reason="needs CUDA and triton")
@pytest.mark.parametrize("cfg", [ImageConfig(patch=2, head_width=16, loss_chunk=64),
                                 ImageConfig(patch=8, head_width=128, loss_chunk=64),
                                 AudioConfig(frame=64, max_channels=2, head_width=128)])
def test_kernels_in_bf16_are_as_close_to_fp32_as_eager_bf16(cfg):
    """bf16 autocast: the kernels and the eager function, both against fp32 eager."""
    torch.manual_seed(0)
    sup = (ImageSupport if isinstance(cfg, ImageConfig) else AudioSupport)(cfg, 64).to("cuda")
    batch = _batch(sup, 3, 150, device="cuda")
    h = torch.randn(3, 150, 64, device="cuda", requires_grad=True)
    exact = _run(sup, h, batch, "eager")
    ref = _run(sup, h, batch, "eager", autocast=True)
    got = _run(sup, h, batch, "triton", autocast=True)
    assert_as_close_to_fp32(got, ref, exact)
