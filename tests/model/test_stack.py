"""The processing stack: explicit mass, conservation, push-then-pop, ACT stop, carried state."""

from __future__ import annotations

import torch

from blocklm.model.config import StackConfig
from blocklm.model.stack import ProcessingStack, stack_pop, stack_push, stack_read


def actions(*rows):
    """[B=1, steps, 3] (push, pop, no-op) probabilities."""
    return torch.tensor([rows], dtype=torch.float32)


def test_read_takes_the_top_unit_of_mass():
    V = torch.tensor([[[1.0], [10.0], [100.0]]])
    s = torch.tensor([[0.3, 0.5, 1.0]])
    # top 0.3 of cell 0, all 0.5 of cell 1, then 0.2 of cell 2
    torch.testing.assert_close(stack_read(V, s), torch.tensor([[0.3 + 5.0 + 20.0]]))


def test_pop_removes_mass_from_the_top_first():
    s = torch.tensor([[0.3, 0.5, 1.0]])
    new, popped = stack_pop(s, torch.tensor([0.6]))
    torch.testing.assert_close(new, torch.tensor([[0.0, 0.2, 1.0]]))
    torch.testing.assert_close(popped, torch.tensor([[0.3, 0.3, 0.0]]))


def test_hard_push_then_pop_returns_the_pushed_value():
    V, s = torch.randn(1, 4, 3), torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    v = torch.randn(1, 3)
    V2, s2, fell = stack_push(V, s, v, torch.tensor([1.0]))
    torch.testing.assert_close(stack_read(V2, s2), v)  # the top is the pushed value
    s3, popped = stack_pop(s2, torch.tensor([1.0]))
    torch.testing.assert_close((popped[..., None] * V2).sum(1), v)  # what left is the value
    torch.testing.assert_close(stack_read(V2, s3), V[:, 0])  # and the old top is back
    assert float(fell) == 0.0


def test_module_push_then_pop_accumulates_the_pushed_value():
    torch.manual_seed(0)
    st = ProcessingStack(StackConfig(depth=4, width=3, hidden=8, max_steps=1), 6)
    V, s = torch.zeros(1, 4, 3), torch.zeros(1, 4)
    x = torch.randn(1, 6)
    _, V, s, stats = st.step(x, V, s, actions=actions((1.0, 0.0, 0.0)))
    pushed = V[:, 0].clone()
    assert float(stats.pushed) == 1.0 and float(s.sum()) == 1.0
    # capture the accumulated output through the output projection's input
    seen = {}
    st.out.register_forward_hook(lambda m, i, o: seen.update(inp=i[0]))
    _, V, s, stats = st.step(x, V, s, actions=actions((0.0, 1.0, 0.0)))
    W = st.cfg.width
    torch.testing.assert_close(seen["inp"][:, W:2 * W], pushed)  # accumulated = popped content
    assert float(stats.popped) == 1.0 and float(s.sum()) == 0.0


def test_mass_is_conserved():
    torch.manual_seed(1)
    st = ProcessingStack(StackConfig(depth=5, width=4, hidden=8, max_steps=3, epsilon=0.01), 6)
    B = 8
    V, s = torch.randn(B, 5, 4), torch.zeros(B, 5)
    s[:, 0] = 1.0  # one unit of mass on the stack
    mass0 = s.sum(1)
    pushed = popped = overflow = torch.zeros(B)
    for _ in range(12):
        _, V, s, stats = st.step(torch.randn(B, 6) * 3, V, s)
        pushed, popped = pushed + stats.pushed, popped + stats.popped
        overflow = overflow + stats.overflow
        assert bool((s >= 0).all() and (s <= 1 + 1e-6).all())
    torch.testing.assert_close(s.sum(1) + popped + overflow, mass0 + pushed)
    # with pushes switched off: stack + fallen off = 1
    V, s = torch.randn(B, 5, 4), torch.zeros(B, 5)
    s[:, 0] = 1.0
    fallen = torch.zeros(B)
    for _ in range(3):
        a = torch.softmax(torch.randn(B, 3, 3), -1) * torch.tensor([0.0, 1.0, 1.0])
        _, V, s, stats = st.step(torch.randn(B, 6), V, s, actions=a)
        fallen = fallen + stats.popped + stats.overflow
    torch.testing.assert_close(s.sum(1) + fallen, torch.ones(B))


def test_act_stop_after_one_unit_left_or_max_steps():
    st = ProcessingStack(StackConfig(depth=4, width=2, hidden=4, max_steps=5, epsilon=0.01), 3)
    V, s = torch.randn(1, 4, 2), torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    a = actions(*[(0.0, 0.6, 0.4)] * 5)
    _, _, s2, stats = st.step(torch.randn(1, 3), V, s, actions=a)
    # 0.6 then the remainder 0.4 of the unit: stop after 2 iterations, exactly one unit left
    assert stats.iterations.tolist() == [2.0]
    torch.testing.assert_close(stats.popped, torch.tensor([1.0]))
    torch.testing.assert_close(s2.sum(), torch.tensor(2.0))
    a = actions(*[(0.0, 0.1, 0.9)] * 5)
    _, _, _, stats = st.step(torch.randn(1, 3), V, s, actions=a)
    assert stats.iterations.tolist() == [5.0]  # max_steps reached first
    torch.testing.assert_close(stats.popped, torch.tensor([0.5]))


def test_padding_step_leaves_stack_unchanged():
    torch.manual_seed(2)
    st = ProcessingStack(StackConfig(depth=4, width=2, hidden=4, max_steps=2), 3)
    V, s = torch.randn(2, 4, 2), torch.rand(2, 4)
    _, V2, s2, _ = st.step(torch.randn(2, 3), V, s, mask=torch.tensor([False, True]))
    assert torch.equal(V2[0], V[0]) and torch.equal(s2[0], s[0])
    assert not torch.equal(s2[1], s[1])


def test_gradcheck_float64_full_jacobian():
    torch.manual_seed(6)
    st = ProcessingStack(StackConfig(depth=3, width=2, hidden=3, max_steps=2), 3).double()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    V = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    s = (torch.rand(2, 3, dtype=torch.float64) * 0.6).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, V, s: st.step(x, V, s)[:3], (x, V, s), eps=1e-6,
                                    atol=1e-6)
