"""The fused stack kernels (stack_fused.py) against the eager ops: values and gradients, ties
and empty cells included. On the CPU through Triton's interpreter (fresh process, small shapes);
on the GPU the kernels themselves (skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blocklm.model.config import StackConfig
from blocklm.model.stack import ProcessingStack, mass_above, stack_pop, stack_push, stack_read

HAS_TRITON = importlib.util.find_spec("triton") is not None


def inputs(B, K, W, seed, device="cpu"):
    """Random stack states with exact ties (a full top cell: weight min(1, 1); empty cells under
    a full unit: min(0, 0)), zero pushes (no shift) and positive ones."""
    g = torch.Generator().manual_seed(seed)
    V = torch.randn(B, K, W, generator=g)
    s = torch.rand(B, K, generator=g) * 0.6
    s[0] = 0.0
    s[0, 0] = 1.0  # tie at the top, zeros below a full unit
    s[1, 1:3] = 0.5  # cumsum hits 1.0 exactly
    s[:, -1] = torch.where(torch.arange(B) % 2 == 0, s[:, -1], torch.zeros(B))
    pop = torch.rand(B, generator=g) * 1.2
    pop[0] = 0.0
    push = torch.rand(B, generator=g)
    push[1::3] = 0.0  # no push: the cells stay in place
    v = torch.randn(B, W, generator=g)
    acc, left = torch.randn(B, W, generator=g), torch.rand(B, generator=g) * 0.3
    return [t.to(device).requires_grad_(True) for t in (V, s, pop, push, v, acc, left)]


def reference_update(V, s, pop, push, v, acc, left):
    new, popped = stack_pop(s, pop, mass_above(s))
    acc = acc + (popped[..., None] * V).sum(1)
    left = left + popped.sum(-1)
    V, s, _ = stack_push(V, new, v, push)
    return V, s, acc, left


def compare(fn, ref, xs, atol=1e-5):
    """Values and gradients (random cotangents) of ``fn`` against ``ref`` on the same leaves."""
    out, out_ref = fn(*xs), ref(*xs)
    out = out if isinstance(out, tuple) else (out,)
    out_ref = out_ref if isinstance(out_ref, tuple) else (out_ref,)
    g = torch.Generator().manual_seed(7)
    cot = [torch.randn(o.shape, generator=g).to(o.device) for o in out_ref]
    grads = torch.autograd.grad(out, xs, cot, allow_unused=True, materialize_grads=True)
    grads_ref = torch.autograd.grad(out_ref, xs, cot, allow_unused=True, materialize_grads=True)
    for a, b in zip(list(out) + list(grads), list(out_ref) + list(grads_ref)):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol)


def check_all(device="cpu", shapes=((6, 5, 4), (4, 8, 3))):
    from blocklm.model.stack_fused import fused_read, fused_update, ponder_fused
    for i, (B, K, W) in enumerate(shapes):
        xs = inputs(B, K, W, seed=i, device=device)
        compare(fused_read, stack_read, xs[:2])
        compare(fused_update, reference_update, xs)
    torch.manual_seed(3)
    st = ProcessingStack(StackConfig(depth=5, width=4, hidden=8, max_steps=3), 6).to(device)
    xs = [t.to(device).requires_grad_(True) for t in
          (torch.randn(4, 8), torch.randn(4, 5, 4), torch.rand(4, 5) * 0.5)]
    running = torch.tensor([1.0, 1.0, 0.0, 1.0], device=device)
    compare(lambda e, V, s: ponder_fused(st, e, V, s, running),
            lambda e, V, s: st.ponder(e, V, s, running, stats=False)[:5], xs)


_INTERP = """
import sys; sys.path.insert(0, {tests!r})
from test_stack_fused import check_all
check_all()
print("ok")
"""


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_fused_kernels_under_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", _INTERP.format(tests=str(Path(__file__).parent))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available() or not HAS_TRITON, reason="needs CUDA")
def test_fused_kernels_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    check_all("cuda", shapes=((6, 5, 4), (4, 8, 3), (9, 256, 64), (3, 100, 48)))
