"""unbind_rows: torch's unbind, with a backward whose launches do not grow with missing rows."""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blocklm.tools.train.state_rows import unbind_rows


class _Count(TorchDispatchMode):
    """Count the aten ops that run (on the GPU each is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _grads(unbind, used: list[int], B: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(B, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(B, 5, 3, generator=g, dtype=torch.float64)
    rows = unbind(t * 2)  # a non-leaf, as the decoder's packed state
    loss = sum((rows[i] * w[i]).sum() for i in used)
    counter = _Count()
    with counter:
        loss.backward()
    return t.grad, counter.ops


def test_values_and_gradients_equal_torchs_unbind():
    t = torch.randn(4, 6, requires_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(unbind_rows(t), t.unbind(0)))
    for used in ([0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 3, 8], [5], [1, 1, 2]):
        ours, _ = _grads(unbind_rows, used)
        ref, _ = _grads(lambda x: x.unbind(0), used)
        assert torch.equal(ours, ref), used


def test_rows_without_a_gradient_cost_no_launch_each():
    """Torch's unbind backward runs one zero fill per row without a gradient (780 launches in 2
    mixed steps on the H200, P94); this one a fixed number whatever the batch."""
    few = _grads(unbind_rows, [0], B=4)[1]
    many = _grads(unbind_rows, [0], B=64)[1]
    assert len(many) == len(few)
    ref_few = _grads(lambda x: x.unbind(0), [0], B=4)[1]
    ref_many = _grads(lambda x: x.unbind(0), [0], B=64)[1]
    assert len(ref_many) - len(ref_few) >= 60  # the per-row fills this replaces


def test_no_rows_with_a_gradient_and_no_autograd():
    t = torch.randn(3, 2, requires_grad=True)
    rows = unbind_rows(t * 1)
    (t * 3).sum().backward()  # the rows are never used: their node gets no gradient at all
    assert torch.equal(t.grad, torch.full((3, 2), 3.0))
    with torch.no_grad():
        assert unbind_rows(t)[0].grad_fn is None
    assert len(rows) == 3
