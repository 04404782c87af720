"""The stack over a block (stack_block.py) against the step-by-step reference, eager and compiled."""

from __future__ import annotations

import pytest
import torch

import blocklm.model.stack_block as sb
from blocklm.model.config import StackConfig
from blocklm.model.stack import ProcessingStack, step_loop
from blocklm.model.stack_block import UNROLL, stack_block


def _setup(seed=0, B=3, T=UNROLL + 5, d=6):
    torch.manual_seed(seed)
    st = ProcessingStack(StackConfig(depth=5, width=4, hidden=8, max_steps=2), d)
    x = torch.randn(B, T, d) * 2
    V = torch.randn(B, 5, 4)
    s = torch.rand(B, 5) * 0.5
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False  # a shorter example: padding at its end
    return st, x, V, s, mask


def _grads(st, fn, x, V, s, mask):
    xs = [t.clone().requires_grad_(True) for t in (x, V, s)]
    y, V2, s2 = fn(st, *xs, mask)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=gen) for t in (y, V2, s2)]
    loss = sum((a * b).sum() for a, b in zip((y, V2, s2), w))
    params = list(st.parameters())
    return (y, V2, s2), torch.autograd.grad(loss, xs + params)


def test_block_equals_step_loop_values_and_gradients():
    st, x, V, s, mask = _setup()
    ref_out, ref_g = _grads(st, step_loop, x, V, s, mask)
    out, g = _grads(st, stack_block, x, V, s, mask)
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow  # torch.compile's tracing takes ~20 s on a CPU
def test_compiled_path_with_time_padding_equals_eager(monkeypatch):
    """The GPU path's graph (torch.compile, here with the CPU-friendly aot_eager backend) and its
    padding of T to a multiple of UNROLL give the eager results, forward and gradients."""
    monkeypatch.setattr(sb, "UNROLL", 3)  # a shorter unrolled graph: faster to trace
    st, x, V, s, mask = _setup(seed=1)
    ref_out, ref_g = _grads(st, step_loop, x, V, s, mask)

    def compiled(st, x, V, s, mask):
        return stack_block(st, x, V, s, mask, backend="aot_eager")
    out, g = _grads(st, compiled, x, V, s, mask)
    assert x.shape[1] % sb.UNROLL != 0  # the padded path ran
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # the dynamic batch: another batch size reuses the graph and still agrees
    st2, x2, V2, s2, mask2 = _setup(seed=2, B=5)
    st2.load_state_dict(st.state_dict())
    y_ref = step_loop(st, x2, V2, s2, mask2)[0]
    y = compiled(st, x2, V2, s2, mask2)[0]
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
