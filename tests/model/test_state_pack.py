"""Packing a block's new state in place: the same rows and gradients as the concatenation, and
no copy of the parts the layers already wrote into their slots."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blocklm.model.decoder import Decoder, StateLayout
from blocklm.model.state_pack import in_place, pack_into

from .test_decoder import cfg


class CopyCount(TorchDispatchMode):
    """Counts the elements written by ``copy_`` ops."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.copy_.default:
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


def test_pack_into_equals_the_concatenation_and_copies_only_what_is_not_in_place():
    torch.manual_seed(0)
    layout = StateLayout({"S0": (2, 3, 4), "z0": (2, 3), "V": (5, 2), "summary": (4,)})
    B = 3
    leaves = {n: torch.randn(B, *shp, requires_grad=True) for n, shp in layout.shapes.items()}
    tail = torch.randn(B, 2, requires_grad=True)

    def parts():  # the summary in bf16 (its dtype comes back in the gradient)
        return {n: (v.to(torch.bfloat16) if n == "summary" else v * 1.0)
                for n, v in leaves.items()}

    cot = torch.randn(B, layout.size + 2)
    want = layout.pack(parts(), tail)
    want_grads = torch.autograd.grad((want * cot).sum(), [*leaves.values(), tail])

    buf, slots = layout.new_rows(B, tail, "cpu")
    new = parts()
    slots["S0"].copy_(new["S0"].detach())  # as the attention kernel writes it: in its slot
    S0 = slots["S0"]
    new["S0"] = _attach(S0, new["S0"])  # the slot, carrying new["S0"]'s autograd history
    assert in_place(new["S0"].reshape(B, -1), buf[:, :24])
    assert not in_place(new["z0"].reshape(B, -1), buf[:, 24:30])
    with CopyCount() as count:
        got = layout.pack_into(buf, new, tail)
    assert got.data_ptr() == buf.data_ptr()
    assert count.elements == B * (layout.size + 2 - 24)  # everything but S0
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    grads = torch.autograd.grad((got * cot).sum(), [*leaves.values(), tail])
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


class _Attach(torch.autograd.Function):
    """Returns ``slot`` (holding x's values) with x's gradient path: what BankedAttentionFn
    does when it wrote its output into a slot."""

    @staticmethod
    def forward(ctx, slot, x):
        return slot

    @staticmethod
    def backward(ctx, g):
        return None, g


def _attach(slot, x):
    return _Attach.apply(slot, x)


def test_fp64_parts_take_the_concatenation():
    layout = StateLayout({"a": (2,), "b": (3,)})
    buf, _ = layout.new_rows(2, None, "cpu")
    parts = {"a": torch.randn(2, 2, dtype=torch.float64), "b": torch.randn(2, 3)}
    got = layout.pack_into(buf, parts)
    assert got.dtype == torch.float64 and got.data_ptr() != buf.data_ptr()
    torch.testing.assert_close(got, layout.pack(parts))


def test_decoder_state_and_gradients_match_the_concatenated_pack(monkeypatch):
    torch.manual_seed(3)
    dec = Decoder(cfg())
    B, T = 2, 6
    x = torch.randn(B, T, 16, requires_grad=True)
    state0 = (dec.initial_state(B) + 0.05 * torch.rand(B, dec.layout.size)).requires_grad_()
    tail = torch.randn(B, 3, requires_grad=True)
    cot = torch.randn(B, dec.layout.size + 3)

    def run():
        h, s = dec(x, state0, tail=tail)
        return [h, s] + list(torch.autograd.grad((s * cot).sum() + h.sum(), [x, state0, tail]))

    new = run()
    monkeypatch.setattr(StateLayout, "pack_into", lambda self, buf, parts, tail=None:
                        self.pack(parts, tail))
    old = run()
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_unkept_states_are_not_packed():
    dec = Decoder(cfg())
    h, s = dec(torch.randn(2, 3, 16), dec.initial_state(2), pack=False)
    assert s is None and h.shape == (2, 3, 16)


def test_pack_into_keeps_the_layout_order():
    layout = StateLayout({"x": (2,), "y": (1,)})
    buf, slots = layout.new_rows(1, None, "cpu")
    got = pack_into(buf, ((0, 2), (2, 3)), [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]])])
    assert got.tolist() == [[1.0, 2.0, 3.0]] and slots["y"].tolist() == [[3.0]]
