"""KernelQKV's Triton kernels against the PyTorch version they replace (fresh random inputs,
forward values and gradients), and the attention layer through either path. CUDA only; on the
CPU the PyTorch version is the path itself (checked by the dispatch test below)."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.attention import BankedAttention
from blocklm.model.attention_io import KernelQKV
from blocklm.model.attention_io_triton import HAS_TRITON, KernelQKVTriton, qkv_triton_ok
from blocklm.model.config import AttentionConfig

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                          reason="needs CUDA and Triton")


def test_cpu_operands_take_the_pytorch_path():
    assert not qkv_triton_ok(torch.zeros(8, 3 * 2 * 16), 16, 16)


def _both(qkv: torch.Tensor, B: int, T: int, Tp: int, H: int, D: int, drop: tuple = ()):
    outs, grads = [], []
    gen = torch.Generator(device=qkv.device).manual_seed(7)
    ups = [torch.randn(B, H, Tp, D, device=qkv.device, generator=gen) for _ in range(3)]
    for fn in (KernelQKV, KernelQKVTriton):
        x = qkv.detach().clone().requires_grad_(True)
        q, k, v = fn.apply(x, B, T, Tp, H, D)
        loss = sum((o.float() * u).sum() for i, (o, u) in enumerate(zip((q, k, v), ups))
                   if i not in drop)
        loss.backward()
        outs.append(torch.stack([q, k, v]))
        grads.append(x.grad)
    return outs, grads


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("B,T,Tp,H,D,pad", [(3, 37, 64, 6, 64, 5), (2, 128, 128, 4, 32, 0),
                                            (5, 1, 16, 2, 16, 3)])
def test_kernels_match_the_pytorch_version(dtype, B, T, Tp, H, D, pad):
    torch.manual_seed(B * 1000 + T)
    qkv = (torch.randn(B * T + pad, 3 * H * D, device="cuda") * 2).to(dtype)
    (ref, new), (gref, gnew) = _both(qkv, B, T, Tp, H, D)
    assert new.dtype == ref.dtype == torch.bfloat16 and new.shape == ref.shape
    # one rounding of the same fp32 value: equal but for exp's last bits (1 bf16 step at most)
    torch.testing.assert_close(new.float(), ref.float(), rtol=2 ** -7, atol=1e-6)
    assert (new[:, :, :, T:] == 0).all()  # padded steps
    assert gnew.dtype == gref.dtype == dtype
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(gnew.float(), gref.float(), rtol=tol, atol=1e-6)
    assert (gnew[B * T:] == 0).all()  # padding rows


@cuda
@pytest.mark.parametrize("drop", [(0,), (2,), (0, 1)])
def test_missing_gradients_are_zero(drop):
    torch.manual_seed(3)
    qkv = torch.randn(2 * 40, 3 * 4 * 64, device="cuda").bfloat16()
    (_, _), (gref, gnew) = _both(qkv, 2, 40, 64, 4, 64, drop=drop)
    torch.testing.assert_close(gnew.float(), gref.float(), rtol=2 ** -7, atol=1e-6)


@cuda
def test_attention_layer_same_through_either_path():
    torch.manual_seed(0)
    outs = []
    for fused in (False, True):
        cfg = AttentionConfig(heads=4, head_dim=64, banks=4, chunk=64, fused_io=fused)
        torch.manual_seed(0)
        layer = BankedAttention(cfg, 256).cuda()
        x = torch.randn(3, 100, 256, device="cuda", requires_grad=True)
        S0 = torch.zeros(3, 4, 4, 64, 64, device="cuda")
        z0 = torch.zeros(3, 4, 4, 64, device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, S, z = layer(x, S0, z0)
        y.float().square().mean().backward()
        outs.append((y.float(), S, x.grad, [p.grad for p in layer.parameters()]))
    (y0, S0, gx0, gp0), (y1, S1, gx1, gp1) = outs
    torch.testing.assert_close(y1, y0, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(S1, S0, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gx1, gx0, rtol=2e-2, atol=2e-4)
    for a, b in zip(gp1, gp0):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-4)


def packed_qkv_errors(device: str, dtype) -> tuple[float, float, bool, bool]:
    """KernelQKVTriton on packed rows against KernelQKV on the same rows put on the grid
    (model/rows.py): max errors of the real steps' values and of the gradient, and whether
    padding steps and padding rows are zero."""
    from blocklm.model.rows import dense, packed_rows

    torch.manual_seed(0)
    B, T, Tp, H, D, lengths = 3, 37, 64, 2, 16, [37, 5, 20]
    r = packed_rows(lengths, T, device)
    qkv = torch.randn(r.n + 9, 3 * H * D, device=device).to(dtype)
    ups = [torch.randn(B, H, Tp, D, device=device) for _ in range(3)]
    outs = []
    for packed in (True, False):
        x = qkv.detach().clone().requires_grad_(True)
        q, k, v = (KernelQKVTriton.apply(x, B, T, Tp, H, D, r) if packed
                   else KernelQKV.apply(dense(x, r), B, T, Tp, H, D))
        sum((o.float() * u).sum() for o, u in zip((q, k, v), ups)).backward()
        outs.append((torch.stack([q, k, v]).float().permute(1, 3, 0, 2, 4), x.grad.float()))
    (a, ga), (b, gb) = outs  # a, b [B, Tp, 3, H, D]
    live = torch.arange(Tp, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
    return ((a[live] - b[live]).abs().max().item(), (ga - gb).abs().max().item(),
            bool((a[~live] == 0).all()), bool((ga[r.n:] == 0).all()))


@cuda
def test_kernels_read_and_write_packed_rows():
    """Packed rows (offsets and lengths): the real steps' q, k, v and the gradient as the
    PyTorch version on the rows put on the grid; padding steps and rows zero."""
    ev, eg, pad_zero, tail_zero = packed_qkv_errors("cuda", torch.bfloat16)
    assert ev <= 2 ** -7 * 8 and eg <= 2 ** -7 * 8 and pad_zero and tail_zero, (ev, eg)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_read_and_write_packed_rows_under_triton_interpreter():
    """The same in fp32 through the kernels on the CPU (``TRITON_INTERPRET=1``), and the dense
    grid's rows through them as well."""
    from .test_banked_triton import run_interpreted

    out = run_interpreted("""
from blocklm.model import attention_io, attention_io_triton
attention_io.KERNEL_DTYPE = attention_io_triton.KERNEL_DTYPE = torch.float32  # no bf16 there
from test_attention_io_triton import packed_qkv_errors
ev, eg, pad_zero, tail_zero = packed_qkv_errors("cpu", torch.float32)
assert ev < 1e-6 and eg < 1e-6 and pad_zero and tail_zero, (ev, eg, pad_zero, tail_zero)
from test_attention_io_triton import _both  # the dense grid through the same kernels
(ref, new), (gref, gnew) = _both(torch.randn(3 * 37 + 5, 3 * 2 * 16), 3, 37, 64, 2, 16)
assert (new - ref).abs().max() < 1e-6 and (gnew - gref).abs().max() < 1e-6
print("ok")
""")
    assert "ok" in out
