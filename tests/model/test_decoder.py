"""The shared decoder: one call == step by step, causality, batching of states, gradcheck."""

from __future__ import annotations

import torch

from blocklm.model.config import AttentionConfig, DecoderConfig, StackConfig
from blocklm.model.decoder import Decoder


def cfg(stack=True, chunk=4):
    return DecoderConfig(d_model=16, d_core=8, d_ff=32, layers=2,
                         attention=AttentionConfig(heads=2, head_dim=4, banks=3, chunk=chunk),
                         stack=StackConfig(enabled=stack, depth=6, width=4, hidden=8, max_steps=2))


def test_block_equals_steps_with_padding():
    torch.manual_seed(0)
    dec = Decoder(cfg())
    B, T = 3, 10
    x = torch.randn(B, T, 16)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 6:] = False
    state0 = dec.initial_state(B) + 0.05 * torch.rand(B, dec.layout.size)  # non-empty context
    h, s1 = dec(x, state0, mask)
    s, hs = state0, []
    for t in range(T):
        ht, s = dec.step(x[:, t], s, mask[:, t])
        hs.append(ht)
    torch.testing.assert_close(h[mask], torch.stack(hs, 1)[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s, atol=1e-5, rtol=1e-5)
    # the padded example's state is its state after its own 6 steps, summary included
    _, s_short = dec(x[1:2, :6], state0[1:2])
    torch.testing.assert_close(s1[1:2], s_short, atol=1e-5, rtol=1e-5)


def test_causality_by_perturbation():
    torch.manual_seed(1)
    dec = Decoder(cfg())
    x = torch.randn(2, 9, 16)
    s0 = dec.initial_state(2)
    h, _ = dec(x, s0)
    for t in (0, 5, 8):
        x2 = x.clone()
        x2[:, t] = torch.randn(2, 16)
        h2, _ = dec(x2, s0)
        assert torch.equal(h2[:, :t], h[:, :t])
        assert not torch.allclose(h2[:, t], h[:, t])


def test_states_batch_along_dim0():
    torch.manual_seed(2)
    dec = Decoder(cfg())
    xa, xb = torch.randn(1, 5, 16), torch.randn(1, 7, 16)
    _, sa = dec(xa, dec.initial_state(1))
    _, sb = dec(xb, dec.initial_state(1))
    y = torch.randn(2, 4, 16)
    h, s = dec(y, torch.cat([sa, sb]))  # block i of one example next to block j of another
    ha, _ = dec(y[:1], sa)
    hb, _ = dec(y[1:], sb)
    torch.testing.assert_close(h, torch.cat([ha, hb]), atol=1e-6, rtol=1e-6)
    assert s.shape == (2, dec.layout.size) and s.dtype == torch.float32


def test_state_carries_context():
    torch.manual_seed(3)
    dec = Decoder(cfg())
    y = torch.randn(1, 3, 16)
    _, sa = dec(torch.randn(1, 5, 16), dec.initial_state(1))
    _, sb = dec(torch.randn(1, 5, 16), dec.initial_state(1))
    assert not torch.allclose(dec(y, sa)[0], dec(y, sb)[0])


def test_gradcheck_float64():
    """Finite differences agree with autograd for the inputs, the state and every parameter."""
    torch.manual_seed(4)
    c = DecoderConfig(d_model=8, d_core=4, d_ff=8, layers=2,
                      attention=AttentionConfig(heads=1, head_dim=2, banks=2, chunk=2),
                      stack=StackConfig(depth=3, width=2, hidden=4, max_steps=2))
    dec = Decoder(c).double()
    names = [n for n, _ in dec.named_parameters()]
    x = torch.randn(1, 3, 8, dtype=torch.float64)
    s0 = dec.initial_state(1, dtype=torch.float64) + 0.3 * torch.rand(1, dec.layout.size,
                                                                      dtype=torch.float64)

    def f(x, s0, *ps):
        h, s = torch.func.functional_call(dec, dict(zip(names, ps)), (x, s0))
        return h, s

    inputs = (x, s0) + tuple(p.detach().clone() for p in dec.parameters())
    inputs = tuple(t.requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


def test_state_unpack_is_one_split_node(grad_consumers):
    """The state's parts come from one split: slicing per part made backward fill and add a
    zero gradient of the whole state per part (25 full-state passes per batch in `small`)."""
    dec = Decoder(cfg(stack=False))
    state = torch.rand(3, dec.layout.size, requires_grad=True)
    _, new = dec(torch.randn(3, 5, 16), state)
    assert grad_consumers(new, state) == ["SplitWithSizesBackward0"]


def test_rmsnorm_of_bf16_equals_torchs_and_keeps_the_dtype():
    """The decoder's RMSNorm normalises bf16 inputs in fp32 (PyTorch's unfused path for a bf16
    input with an fp32 weight cost ~16 ops per call): same values, same output dtype."""
    from blocklm.model.decoder import RMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(48), torch.nn.RMSNorm(48)
    with torch.no_grad():
        ours.weight.copy_(torch.rand(48) + 0.5)
        ref.weight.copy_(ours.weight)
    for x in (torch.randn(5, 7, 48).bfloat16(), torch.randn(5, 48)):
        y = ours(x)
        assert y.dtype == x.dtype
        torch.testing.assert_close(y, ref(x), rtol=0, atol=0)


def test_grid_rows_give_the_same_block_and_grid_shapes():
    """On CUDA the layers' matrices get B*T rounded up to a coarse grid (cuBLAS chooses a
    kernel per new shape at ~3-5 ms of host time, and B*T is new in nearly every batch): same
    outputs, states and gradients as unpadded, and the linears only ever see grid shapes."""
    from blocklm.model.decoder import token_rows

    assert [token_rows(m) for m in (1, 64, 65, 1000, 13_517, 20_000)] == \
        [64, 64, 128, 1024, 13_824, 20_480]
    assert all(token_rows(m) >= m and token_rows(m) - m < max(64, m / 16)
               for m in range(1, 70_000, 37))
    torch.manual_seed(0)
    dec = Decoder(cfg(stack=False))
    B, T = 3, 10
    x = torch.randn(B, T, 16, requires_grad=True)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[2, 4:] = False
    state = dec.initial_state(B) + 0.05 * torch.rand(B, dec.layout.size)
    seen = []
    dec.layers[0].down.register_forward_hook(lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1]))
    outs = []
    for grid in (False, True):
        dec.grid_rows = grid
        h, s = dec(x, state, mask)
        (gx,) = torch.autograd.grad(h[mask].square().sum() + s.sum(), x)
        outs.append((h, s, gx))
    assert seen == [B * T, 64]
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_layer_casts_the_residual_stream_once_under_autocast(grad_consumers):
    """Under bf16 autocast a layer reads its fp32 input through one cast (the down projection
    and the concatenation share it): a cast per reader was one more [M, d_model] pass forward
    and a cast-back and an add in backward, per layer and batch."""
    from blocklm.model.decoder import BottleneckLayer

    torch.manual_seed(0)
    layer = BottleneckLayer(cfg(stack=False))
    x = torch.randn(2, 5, 16, requires_grad=True)
    S, z = torch.zeros(2, 2, 3, 4, 4), torch.zeros(2, 2, 3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, _ = layer(x, S, z)
    assert y.dtype == torch.float32
    assert sorted(grad_consumers(y, x)) == ["AddBackward0", "ToCopyBackward0"]
