"""The core norm of a bf16 input in bf16 on CUDA (rms_norm_low): within bf16 rounding of the
fp32 route, fp32's eps. Run here on the CPU (the function is device-agnostic; RMSNorm takes it
only on CUDA, the CPU keeps the fp32 route: test_decoder's exact test)."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.decoder import RMSNorm, rms_norm_low


def _fp32_route(x, weight):
    return torch.nn.functional.rms_norm(x.float(), (x.shape[-1],), weight).to(x.dtype)


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_low_precision_norm_matches_the_fp32_route(scale):
    """Values and gradients (input and weight) within bf16 rounding, also for rows of small
    norm, where an eps of bf16's 2^-7 would flatten them (outputs ~70x too small at 1e-3)."""
    torch.manual_seed(0)
    w = (torch.rand(384) + 0.5).requires_grad_(True)
    x = (scale * torch.randn(64, 384)).bfloat16().requires_grad_(True)
    dy = torch.randn(64, 384).bfloat16()
    got = rms_norm_low(x, (384,), w, None)
    ref = _fp32_route(x, w)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=2 ** -7, atol=1e-2)
    g_got = torch.autograd.grad(got, (x, w), dy)
    g_ref = torch.autograd.grad(ref, (x, w), dy)
    for a, b in zip(g_got, g_ref):
        err = (a.float() - b.float()).abs().max() / b.float().abs().max()
        assert err < 2e-2, err


def test_rmsnorm_on_cpu_keeps_the_fp32_route():
    """The CPU (the reference) is untouched: bit for bit the fp32 route."""
    torch.manual_seed(1)
    norm = RMSNorm(48)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(48) + 0.5)
    x = torch.randn(7, 48).bfloat16()
    assert torch.equal(norm(x), _fp32_route(x, norm.weight))
