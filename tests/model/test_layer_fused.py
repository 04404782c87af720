"""The decoder layers through model/layer_fused.py: same outputs, states and gradients as the
plain layers (eager functions, the aot_eager compile of them on the CPU, Inductor on CUDA in
test_cuda-style runs), in fp32 and under bf16 autocast; one compiled graph for varying shapes."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.config import AttentionConfig, DecoderConfig, StackConfig
from blocklm.model.decoder import Decoder


def cfg(chunk=4, head_dim=4):
    return DecoderConfig(d_model=16, d_core=8, d_ff=32, layers=2,
                         attention=AttentionConfig(heads=2, head_dim=head_dim, banks=3,
                                                   chunk=chunk),
                         stack=StackConfig(enabled=False))


def _run(dec, x, state, mask, form, grid=None, autocast=False):
    dec.fused_layers, dec.grid_rows = form, grid
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        h, s = dec(x, state, mask)
    loss = h[mask].float().square().sum() + s.sum()
    grads = torch.autograd.grad(loss, [x, state] + list(dec.parameters()))
    return h, s, grads


def _inputs(B=3, T=10, device="cpu", seed=0):
    torch.manual_seed(seed)
    dec = Decoder(cfg()).to(device)
    x = torch.randn(B, T, 16, device=device, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    mask[-1, min(4, T - 1):] = False
    state = (dec.initial_state(B, device) + 0.05 * torch.rand(B, dec.layout.size, device=device)
             ).requires_grad_(True)
    return dec, x, state, mask


@pytest.mark.parametrize("grid", [False, True])
def test_fused_layers_equal_the_plain_layers_fp32(grid):
    """T = 10 with chunk 4: the fused path pads time to 12 (whole chunks) and rows to the
    grid (64) when asked; outputs, states and every gradient match the plain layers."""
    dec, x, state, mask = _inputs()
    ref = _run(dec, x, state, mask, "off")
    got = _run(dec, x, state, mask, "eager", grid=grid)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for a, b in zip(got[2], ref[2]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_fused_layers_under_bf16_autocast_match_the_plain_layers():
    """Under bf16 autocast both forms cast the same tensors at the same places; rounding may
    land elsewhere (a bf16 input used twice has its two gradients summed in bf16 here, in fp32
    after two casts there), so both are measured against the fp32 result: the fused form is
    no further from it than the plain one (both ~0.5% of each tensor's largest value)."""
    dec, x, state, mask = _inputs()
    exact = _run(dec, x, state, mask, "off")
    ref = _run(dec, x, state, mask, "off", autocast=True)
    got = _run(dec, x, state, mask, "eager", autocast=True)
    assert got[0].dtype == ref[0].dtype
    for a, b, c in zip(got[:2] + got[2], ref[:2] + ref[2], exact[:2] + exact[2]):
        scale = c.abs().max()
        err_fused, err_plain = (a - c).abs().max() / scale, (b - c).abs().max() / scale
        assert err_fused <= 1.5 * err_plain + 3e-3, (err_fused, err_plain)
        assert err_fused < 2e-2


def test_compiled_graph_is_shared_by_layers_and_shapes():
    """Dynamo traces pre and post without graph breaks, and one dynamic graph each serves both
    layers and batches of other B and T (a recompile per shape would cost seconds each)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    for B, T in ((3, 10), (5, 7), (4, 13)):
        dec, x, state, mask = _inputs(B, T)
        ref = _run(dec, x, state, mask, "off")
        got = _run(dec, x, state, mask, "aot_eager", grid=True)
        torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
        for a, b in zip(got[2], ref[2]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Inductor + Triton)")
def test_inductor_layers_equal_the_plain_layers_on_cuda():
    """The compiled CUDA path (Inductor, bf16 autocast, Triton attention; opt-in by
    ``DecoderConfig.compile_layers``) against the plain layers under the same autocast."""
    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(d_model=64, d_core=32, d_ff=128, layers=2,
                                attention=AttentionConfig(heads=2, head_dim=16, banks=3,
                                                          chunk=64),
                                stack=StackConfig(enabled=False))).cuda()
    x = torch.randn(6, 130, 64, device="cuda", requires_grad=True)
    state = (dec.initial_state(6, "cuda") + 0.05 * torch.rand(6, dec.layout.size, device="cuda")
             ).requires_grad_(True)
    mask = torch.ones(6, 130, dtype=torch.bool, device="cuda")
    mask[2, 70:] = False
    exact = _run(dec, x, state, mask, "off", grid=True)
    ref = _run(dec, x, state, mask, "off", grid=True, autocast=True)
    got = _run(dec, x, state, mask, "compiled", autocast=True)
    for a, b, c in zip(got[:2] + got[2], ref[:2] + ref[2], exact[:2] + exact[2]):
        scale = c.abs().max()
        err_fused, err_plain = (a - c).abs().max() / scale, (b - c).abs().max() / scale
        assert err_fused <= 1.5 * err_plain + 3e-3, (err_fused, err_plain)


@pytest.mark.parametrize("autocast", [False, True])
def test_warm_layers_compiles_the_specialisations_ahead(autocast):
    """warm_layers runs the graphs for batch 1 and > 1 and for lengths with and without time
    padding: batches of those kinds then compile nothing new. Under bf16 autocast the
    residual stream is bf16, and the warm-up's x must be too (it was fp32: every graph was
    compiled again for bf16 at the first batches, GPU_NOTES P72)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    dec, _, _, _ = _inputs()
    dec.fused_layers = "aot_eager"
    dec.warm_layers("cpu", autocast=autocast)
    warmed = counters["stats"]["unique_graphs"]
    assert warmed >= 2
    for B, T in ((1, 5), (3, 8), (4, 7), (1, 12)):
        _, x, state, mask = _inputs(B, T)
        if autocast:
            x = x.detach().to(torch.bfloat16).requires_grad_()
        _run(dec, x, state, mask, "aot_eager", grid=True, autocast=autocast)
    assert counters["stats"]["unique_graphs"] == warmed
