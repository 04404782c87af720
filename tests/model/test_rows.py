"""Packed rows (model/rows.py): the layers on the real steps only give the real steps' outputs,
the memories and every gradient of the dense grid, and their products see fewer rows."""

from __future__ import annotations

import pytest
import torch

from blocklm.model import attention, banked_triton
from blocklm.model.attention import BankedAttention
from blocklm.model.attention_io import KernelRowsPacked
from blocklm.model.config import AttentionConfig
from blocklm.model.decoder import Decoder
from blocklm.model.rows import (
    dense,
    dense_rows,
    from_rows,
    head_index,
    packed_rows,
    to_rows,
    undense,
)

from .test_attention_io import RefKernel
from .test_decoder import cfg


def test_packed_rows_layout():
    r = packed_rows([3, 1, 4], 4, "cpu")
    assert (r.B, r.T, r.n, r.packed) == (3, 4, 8, True)
    assert r.index.tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert r.step.tolist() == [0, 1, 2, 0, 0, 1, 2, 3]
    assert r.offsets.tolist() == [0, 3, 4] and r.lengths.tolist() == [3, 1, 4]
    assert not dense_rows(3, 4).packed
    # (row, head) -> row of a [B,H,Tp,E] tensor flattened to [B*H*Tp, E]
    hi = head_index(r, 2, 8)
    assert hi.view(8, 2)[3].tolist() == [(1 * 2 + 0) * 8 + 0, (1 * 2 + 1) * 8 + 0]
    assert head_index(r, 2, 8) is hi  # made once per batch


@pytest.mark.parametrize("lengths", [[0, 2], [5, 1], []])
def test_packed_rows_refuse_step_counts_off_the_grid(lengths):
    with pytest.raises(ValueError, match="step counts"):
        packed_rows(lengths, 4, "cpu")


def test_to_and_from_the_grid_are_inverse_with_their_gradients():
    r = packed_rows([2, 5, 1], 5, "cpu")
    x = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    rows = to_rows(x, r, 11)
    assert rows.shape == (11, 4) and not rows[8:].any()
    assert torch.equal(rows[2:7], x[1].detach())
    back = from_rows(rows, r)
    mask = torch.arange(5)[None] < torch.tensor([[2], [5], [1]])
    assert torch.equal(back[mask], x[mask].detach()) and not back[~mask].any()
    torch.autograd.gradcheck(lambda t: to_rows(t, r, 11), (x,))
    y = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda t: from_rows(t, r), (y,))
    torch.autograd.gradcheck(lambda t: undense(dense(t, r), r, 9), (y,))


def test_packed_output_gather_and_its_gradient():
    """KernelRowsPacked: row i's H*E values are o[b, :, t, :] of its step; the gradient
    reaches only real steps."""
    B, H, Tp, E, T = 3, 2, 8, 4, 6
    r = packed_rows([6, 2, 3], T, "cpu")
    o = torch.randn(B, H, Tp, E, dtype=torch.float64, requires_grad=True)
    out = KernelRowsPacked.apply(o, head_index(r, H, Tp), r.n, 16)
    assert out.shape == (16, H * E) and not out[r.n:].any()
    assert torch.equal(out[7].view(H, E), o[1, :, 1].detach())  # example 1, step 1
    torch.autograd.gradcheck(lambda t: KernelRowsPacked.apply(t, head_index(r, H, Tp), r.n, 16),
                             (o,))
    out.sum().backward()
    live = torch.zeros(B, Tp, dtype=torch.bool)
    for b, n in enumerate([6, 2, 3]):
        live[b, :n] = True
    assert not o.grad.transpose(1, 2)[~live].any() and o.grad.transpose(1, 2)[live].eq(1).all()


def fp64_block_batch(dec):
    """A block batch for an fp64 decoder: B=3, T=10, real steps [10, 4, 7] -> lengths, mask,
    x [B,T,16] and a non-empty state, both requiring gradients."""
    B, T, lengths = 3, 10, [10, 4, 7]
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    x = torch.randn(B, T, 16, dtype=torch.float64, requires_grad=True)
    state = (dec.initial_state(B, dtype=torch.float64)
             + 0.05 * torch.rand(B, dec.layout.size, dtype=torch.float64)).requires_grad_(True)
    return lengths, mask, x, state


def decoder_runs(dec, x, state, mask, lengths, seen, attr="packed_rows", values=(False, True)):
    """The decoder on the batch once per value of its attribute ``attr``: per run the real
    steps' outputs, the state, the gradients of x, state and every parameter, and what the
    hooks put in ``seen`` (cleared before each run)."""
    outs = []
    for value in values:
        dec.zero_grad()
        setattr(dec, attr, value)
        seen.clear()
        h, s = dec(x, state, mask, lengths=lengths)
        loss = h[mask].square().sum() + s.square().sum()
        grads = torch.autograd.grad(loss, [x, state] + list(dec.parameters()))
        outs.append((h[mask], s, grads, list(seen)))
    return outs


@pytest.mark.parametrize("grid", [False, True])
def test_decoder_on_packed_rows_equals_the_dense_grid(grid):
    """Real steps' outputs, the states and every gradient as on the dense grid (fp64, with
    the stack); the layers' products see the real steps only (or their grid rows)."""
    torch.manual_seed(0)
    dec = Decoder(cfg()).double()
    dec.grid_rows = grid
    lengths, mask, x, state = fp64_block_batch(dec)
    B, T = mask.shape
    seen = []
    dec.layers[0].down.register_forward_hook(
        lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1]))
    (h0, s0, g0, rows0), (h1, s1, g1, rows1) = decoder_runs(dec, x, state, mask, lengths, seen)
    assert rows0 == [64 if grid else B * T] and rows1 == [64 if grid else sum(lengths)]
    torch.testing.assert_close(h1, h0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(s1, s0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_decoder_keeps_the_dense_grid_without_padding_or_counts():
    torch.manual_seed(1)
    dec = Decoder(cfg(stack=False))
    dec.packed_rows = True
    seen = []
    dec.layers[0].down.register_forward_hook(
        lambda m, i, o: seen.append(i[0].numel() // i[0].shape[-1]))
    x = torch.randn(2, 5, 16)
    full = torch.ones(2, 5, dtype=torch.bool)
    dec(x, dec.initial_state(2), full, lengths=[5, 5])  # nothing to skip
    part = full.clone()
    part[1, 3:] = False
    dec(x, dec.initial_state(2), part)  # no host step counts: the mask is not read back
    assert seen == [10, 10]
    with pytest.raises(ValueError, match="2 step counts for a batch of 3"):
        dec(torch.randn(3, 5, 16), dec.initial_state(3), torch.ones(3, 5, dtype=torch.bool),
            lengths=[5, 5])


@pytest.mark.parametrize("memory", [True, False])
def test_kernel_route_on_packed_rows_equals_the_dense_grid(monkeypatch, memory):
    """The attention's kernel route (the wrapper with the reference as its kernel, as in
    test_attention_io) on packed rows: real rows' outputs, the memories and the gradients of
    the dense rows, under bf16 autocast."""
    monkeypatch.setattr(banked_triton, "BankedAttentionFn", RefKernel)
    monkeypatch.setattr(attention, "kernel_path", lambda q, v, chunk: True)
    torch.manual_seed(0)
    att = BankedAttention(AttentionConfig(heads=2, head_dim=16, banks=3, chunk=16), 24)
    B, T, lengths = 3, 21, [21, 13, 4]
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    x = torch.randn(B, T, 24)
    S = torch.rand(B, 2, 3, 16, 16, requires_grad=True) if memory else None
    z = torch.rand(B, 2, 3, 16, requires_grad=True) if memory else None
    res = []
    for lay, M in ((dense_rows(B, T), 70), (packed_rows(lengths, T, "cpu"), 40)):
        xr = to_rows(x, lay, M).requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y, S1, z1 = att(xr * 1, S, z, mask, lay)
        assert y.shape == (M, 24)
        loss = (from_rows(y, lay)[mask].float().square().sum() + S1.square().sum() + z1.sum())
        leaves = [t for t in (S, z) if t is not None] + list(att.parameters())
        grads = torch.autograd.grad(loss, [xr] + leaves)
        res.append((from_rows(y, lay)[mask], S1, z1, from_rows(grads[0], lay)[mask], grads[1:]))
    (y0, S0, z0, gx0, g0), (y1, S1, z1, gx1, g1) = res
    assert torch.equal(y1, y0)  # the same bf16 rows through the same kernel
    for a, b in [(S1, S0), (z1, z0), (gx1, gx0)] + list(zip(g1, g0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_packed_rows_tensors_start_at_16_byte_boundaries():
    """Triton specialises pointers on 16-byte alignment: offsets and lengths (and the rest)
    start on one whatever B and n are odd or even, so no kernel variant is compiled mid-run."""
    for lengths in ([3], [3, 2], [1, 2, 2], [4, 4, 4, 1]):
        r = packed_rows(lengths, 4, "cpu")
        base = r.offsets.data_ptr()
        assert all((t.data_ptr() - base) % 16 == 0 for t in (r.lengths, r.index, r.step))


def test_text_head_on_packed_rows_equals_the_grid(model):
    """The content head on the real steps only: each block's bits and the gradient of h as on
    the padded grid (padding steps get none)."""
    sup = model.support("text")
    batch = sup.target(["To be, or not to be", "Ay", "Good morrow, cousin."])
    B, T = batch.steps.shape
    assert batch.lengths == tuple(batch.steps.sum(1).tolist()) and sum(batch.lengths) < B * T
    h = torch.randn(B, T, model.cfg.decoder.d_model, requires_grad=True)
    rows = packed_rows(batch.lengths, T, "cpu")
    (a, ea), (b, eb) = sup.bits(h, batch), sup.bits(h, batch, rows)
    torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-5)
    assert torch.equal(ea, eb)
    ga, = torch.autograd.grad(a.sum(), h)
    gb, = torch.autograd.grad(b.sum(), h)
    torch.testing.assert_close(gb, ga, rtol=1e-5, atol=1e-7)
    assert not gb[~batch.steps].any()


@pytest.mark.parametrize("mode", ["text", "audio"])
def test_run_block_on_packed_rows_equals_the_grid(model, mode, monkeypatch):
    """A whole block batch through ``run_block`` (decoder and content head) with the layers
    and the text head on packed rows: the same losses, states and parameter gradients."""
    import numpy as np

    contents = ["To be, or not to be", "Ay", "Good morrow, cousin."] if mode == "text" else \
        [np.random.default_rng(i).integers(-3000, 3000, (n, 1)).astype(np.int16)
         for i, n in enumerate((300, 90, 170))]
    outs = []
    for packed in (False, True):
        monkeypatch.setattr(model.decoder, "packed_rows", packed)  # undone after the test
        model.zero_grad()
        res = model.run_block(mode, contents, targets=True, logits=False)
        loss = res.loss.bits.sum() + res.loss.mode_bits.sum() + res.state.square().sum()
        loss.backward()
        outs.append((res.loss.bits.detach(), res.state.detach(),
                     [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (b0, s0, g0), (b1, s1, g1) = outs
    torch.testing.assert_close(b1, b0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    assert len(g1) == len(g0)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
