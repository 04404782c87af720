"""KernelGates' Triton kernels against the PyTorch version they replace: gates and the logits'
gradient on the dense grid (with and without a mask, padding rows) and on packed rows. CUDA, and
on the CPU through Triton's interpreter (fp32) where Triton is installed."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.attention_gates_triton import HAS_TRITON, KernelGatesTriton, gates_triton_ok
from blocklm.model.attention_io import KernelGates

cuda = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_TRITON),
                          reason="needs CUDA and Triton")


def test_cpu_logits_take_the_pytorch_path():
    assert not gates_triton_ok(torch.zeros(8, 2 * 2 * 4 + 2), 16)


def gates_errors(device: str, dtype, packed: bool, masked: bool = True,
                 drop: tuple = ()) -> tuple[float, float]:
    """Max error of the gates (every position of [B,H,Tp,N] and [B,H,Tp]) and of the logits'
    gradient, KernelGatesTriton against KernelGates (on packed rows: on the rows put on the
    grid, as the attention did). Raises if padding rows get a gradient."""
    from blocklm.model.rows import dense, packed_rows

    torch.manual_seed(1)
    B, T, Tp, H, N, lengths = 3, 37, 64, 2, 4, [37, 5, 20]
    steps = torch.arange(T, device=device)
    mask = steps[None] < torch.tensor(lengths, device=device)[:, None]
    r = packed_rows(lengths, T, device) if packed else None
    n = r.n if packed else B * T
    sel = (torch.randn(n + 7, 2 * H * N + H, device=device) * 3).to(dtype)
    sel[:, -H:] -= 12  # some retentions under the clamp (sigmoid < 1e-6)
    ups = [torch.randn(B, H, Tp, N, device=device), torch.randn(B, H, Tp, N, device=device),
           torch.randn(B, H, Tp, device=device)]
    outs = []
    for fn in ("triton", "torch"):
        x = sel.detach().clone().requires_grad_(True)
        m = mask if masked or packed else None
        if fn == "triton":
            got = KernelGatesTriton.apply(x, m, B, T, Tp, H, N, r)
        else:
            got = KernelGates.apply(dense(x, r) if packed else x, m, B, T, Tp, H, N)
        sum((o * u).sum() for i, (o, u) in enumerate(zip(got, ups)) if i not in drop).backward()
        outs.append((got, x.grad.float()))
    (a, ga), (b, gb) = outs
    assert (ga[n:] == 0).all() and (gb[n:] == 0).all()
    ev = max((x - y).abs().max().item() for x, y in zip(a, b))
    return ev, (ga - gb).abs().max().item()


@cuda
@pytest.mark.parametrize("packed,masked", [(False, True), (False, False), (True, True)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_match_the_pytorch_version(packed, masked, dtype):
    ev, eg = gates_errors("cuda", dtype, packed, masked)
    # fp32 arithmetic on both sides; the gradient rounded once to the logits' dtype
    assert ev < 1e-5 and eg < (2 ** -7 if dtype == torch.bfloat16 else 1e-5), (ev, eg)


@cuda
@pytest.mark.parametrize("drop", [(0,), (1,), (2,), (0, 2)])
def test_missing_gradients_are_zero(drop):
    ev, eg = gates_errors("cuda", torch.float32, True, drop=drop)
    assert ev < 1e-5 and eg < 1e-5, (ev, eg)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_match_under_triton_interpreter():
    """The same in fp32 through the kernels on the CPU (``TRITON_INTERPRET=1``)."""
    from .test_banked_triton import run_interpreted

    out = run_interpreted("""
from test_attention_gates_triton import gates_errors
for packed, masked, drop in ((False, True, ()), (False, False, ()), (True, True, ()),
                             (True, True, (1,)), (False, True, (0, 2))):
    ev, eg = gates_errors("cpu", torch.float32, packed, masked, drop)
    assert ev < 1e-6 and eg < 1e-6, (packed, masked, drop, ev, eg)
print("ok")
""")
    assert "ok" in out
