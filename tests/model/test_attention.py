"""Banked linear attention: the two forms agree, causality, read/write semantics of the banks."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.attention import BankedAttention, bank_read, bank_write, feature_map
from blocklm.model.config import AttentionConfig


def make(chunk=4, banks=3, seed=0):
    torch.manual_seed(seed)
    att = BankedAttention(AttentionConfig(heads=2, head_dim=4, banks=banks, chunk=chunk), 8)
    with torch.no_grad():  # spread the selectors so banks really differ
        att.select.weight.mul_(20.0)
        att.select.bias[:-2].normal_(0, 1.0)
    return att


def zero_state(att, B):
    shp = att.state_shapes()
    return torch.zeros(B, *shp["S"]), torch.zeros(B, *shp["z"])


def run_steps(att, x, S, z, mask=None):
    ys = []
    for t in range(x.shape[1]):
        y, S, z = att.step(x[:, t], S, z, None if mask is None else mask[:, t])
        ys.append(y)
    return torch.stack(ys, 1), S, z


@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_recurrent_equals_chunked(chunk):
    att = make(chunk=chunk)
    x = torch.randn(3, 11, 8)
    S0, z0 = zero_state(att, 3)
    S0, z0 = S0 + torch.rand_like(S0), z0 + torch.rand_like(z0)  # a non-empty incoming memory
    y1, S1, z1 = att(x, S0, z0)
    y2, S2, z2 = run_steps(att, x, S0, z0)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(S1, S2, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(z1, z2, atol=1e-5, rtol=1e-5)


def test_causality_by_perturbation():
    att = make()
    x = torch.randn(2, 10, 8)
    S0, z0 = zero_state(att, 2)
    y, _, _ = att(x, S0, z0)
    for t in (0, 4, 9):
        x2 = x.clone()
        x2[:, t] += torch.randn(2, 8)
        y2, _, _ = att(x2, S0, z0)
        assert torch.equal(y2[:, :t], y[:, :t])
        assert not torch.allclose(y2[:, t], y[:, t])


def test_read_leaves_memory_unchanged():
    S, z = torch.rand(2, 2, 3, 4, 5), torch.rand(2, 2, 3, 4)
    S_copy, z_copy = S.clone(), z.clone()
    q, r = feature_map(torch.randn(2, 2, 4)), torch.softmax(torch.randn(2, 2, 3), -1)
    bank_read(S, z, q, r, 1e-3)
    assert torch.equal(S, S_copy) and torch.equal(z, z_copy)
    # and in the layer: what is read (query, read logits) never changes the written state
    att = make()
    x = torch.randn(2, 8)
    S0, z0 = zero_state(att, 2)
    S0 = S0 + 1
    _, S1, z1 = att.step(x, S0, z0)
    with torch.no_grad():
        att.qkv.weight[:8].normal_()  # query projection
        att.select.weight[:6].normal_()  # read logits
    _, S2, z2 = att.step(x, S0, z0)
    assert torch.equal(S1, S2) and torch.equal(z1, z2)


def test_read_is_superposition_of_banks():
    S, z = torch.rand(1, 1, 2, 3, 4), torch.rand(1, 1, 2, 3) + 0.5
    q = torch.rand(1, 1, 3)
    r = torch.tensor([[[0.25, 0.75]]])
    got = bank_read(S, z, q, r, 0.0)
    num = 0.25 * q[0, 0] @ S[0, 0, 0] + 0.75 * q[0, 0] @ S[0, 0, 1]
    den = 0.25 * q[0, 0] @ z[0, 0, 0] + 0.75 * q[0, 0] @ z[0, 0, 1]
    torch.testing.assert_close(got[0, 0], num / den)


def test_zero_write_probability_leaves_bank_unchanged():
    S, z = torch.rand(1, 1, 3, 2, 2), torch.rand(1, 1, 3, 2)
    k, v = torch.rand(1, 1, 2), torch.rand(1, 1, 2)
    w = torch.tensor([[[0.0, 0.3, 0.7]]])
    g = torch.tensor([[0.9]])
    S2, z2 = bank_write(S, z, k, v, w, g)
    assert torch.equal(S2[:, :, 0], S[:, :, 0]) and torch.equal(z2[:, :, 0], z[:, :, 0])
    # bank 1 decays by 1 - 0.3 * (1 - 0.9) and receives 0.3 k v^T
    a = 1 - 0.3 * 0.1
    torch.testing.assert_close(S2[0, 0, 1], a * S[0, 0, 1] + 0.3 * torch.outer(k[0, 0], v[0, 0]))
    torch.testing.assert_close(z2[0, 0, 2], (1 - 0.7 * 0.1) * z[0, 0, 2] + 0.7 * k[0, 0])


def test_padding_steps_leave_memory_unchanged():
    att = make()
    x = torch.randn(2, 7, 8)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 4:] = False
    S0, z0 = zero_state(att, 2)
    _, S1, z1 = att(x, S0, z0, mask)
    _, S2, z2 = att(x[:1, :4], S0[:1], z0[:1])
    torch.testing.assert_close(S1[:1], S2, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(z1[:1], z2, atol=1e-6, rtol=1e-6)


def test_decay_initialised_to_last():
    att = BankedAttention(AttentionConfig(heads=2, head_dim=4, banks=1, decay_init=5.0), 8)
    with torch.no_grad():
        att.select.weight.zero_()
    S, z = zero_state(att, 1)
    S, z = S + 1, z + 1
    for _ in range(50):  # 50 writes into the only bank
        _, S, z = att.step(torch.randn(1, 8), S * 0 + S, z)
    assert bool((z > 0.7).all())  # sigmoid(5)^50 ~ 0.71 of the first memory is still there


def test_bf16_autocast_keeps_fp32_state():
    att = make()
    x = torch.randn(2, 6, 8)
    S0, z0 = zero_state(att, 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, S, z = att(x, S0, z0)
    assert S.dtype == torch.float32 and z.dtype == torch.float32
    assert torch.isfinite(y.float()).all()


def test_gradcheck_float64_full_jacobian():
    torch.manual_seed(5)
    att = BankedAttention(AttentionConfig(heads=1, head_dim=2, banks=2, chunk=2), 4).double()
    x = torch.randn(1, 3, 4, dtype=torch.float64, requires_grad=True)
    S = torch.rand(1, 1, 2, 2, 2, dtype=torch.float64, requires_grad=True)
    z = (torch.rand(1, 1, 2, 2, dtype=torch.float64) + 0.5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, S, z: att(x, S, z), (x, S, z), eps=1e-6, atol=1e-6)


def test_saturated_selectors_stay_finite():
    att = make(chunk=8)
    with torch.no_grad():  # write with probability 1 and retention 0: full overwrite every step
        att.select.weight.zero_()
        att.select.bias.zero_()
        att.select.bias[6:12] = torch.tensor([1e4, -1e4, -1e4] * 2)
        att.select.bias[12:] = -1e4
    x = torch.randn(2, 12, 8, requires_grad=True)
    S0, z0 = zero_state(att, 2)
    y, S, z = att(x, S0, z0)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(S).all() and torch.isfinite(x.grad).all()
    y2, _, _ = run_steps(att, x.detach(), S0, z0)
    torch.testing.assert_close(y.detach(), y2, atol=1e-5, rtol=1e-5)
