"""The stack loop as CUDA graphs (stack_graph.py) against the eager step loop, on the GPU.

Skipped without CUDA; run on the device (output in model/GPU_NOTES.md)."""

from __future__ import annotations

import pytest
import torch

from blocklm.model.config import StackConfig
from blocklm.model.stack import ProcessingStack, step_loop
from blocklm.model.stack_block import stack_block
from blocklm.model.stack_graph import _CACHE, chunked_loop, eager_runner_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _setup(seed, B, T, K=32, W=16, Hd=32, d=48):
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = False
    cfg = StackConfig(depth=K, width=W, hidden=Hd, max_steps=2, graphs=True, graph_unroll=4,
                      fused=False, fused_ctrl=False)  # the eager body's graphs (ctrl: own test)
    st = ProcessingStack(cfg, d).cuda()
    x = torch.randn(B, T, d, device="cuda")
    V, s = torch.randn(B, K, W, device="cuda"), torch.rand(B, K, device="cuda") * 0.3
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[min(2, B - 1), T // 2 + 1:] = False
    return st, x, V, s, mask


def _chunked_eager(st, x, V, s, mask):
    read, acc, es, V, s = chunked_loop(st, st.embed(x), mask.float(), V, s, 4,
                                       eager_runner_for(st))
    return st.output(read, acc, es), V, s


def _run(st, fn, x, V, s, mask, autocast=False, blocks=2, cache=True):
    """``blocks`` blocks in a row from the carried state, both forwards before one backward."""
    xs = [t.clone().requires_grad_(True) for t in (x, V, s)]
    T = x.shape[1] // blocks
    ys, V2, s2 = [], xs[1], xs[2]
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast, cache_enabled=cache):
        for b in range(blocks):
            sl = slice(b * T, (b + 1) * T)
            y, V2, s2 = fn(st, xs[0][:, sl], V2, s2, mask[:, sl])
            ys.append(y)
    y = torch.cat(ys, 1)
    loss = (y.float() ** 2).sum() + (V2 * 0.1).sum() + s2.sum()
    return [y.float(), V2, s2] + list(torch.autograd.grad(loss, xs + list(st.parameters())))


def test_graphs_match_the_step_loop_fp32():
    st, x, V, s, mask = _setup(0, B=5, T=2 * 11)  # 11 steps a block: time padding to 12
    for a, b in zip(_run(st, stack_block, x, V, s, mask), _run(st, step_loop, x, V, s, mask)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_graphs_under_bf16_autocast():
    """Against the same chunks run eagerly and the eager block without autocast's weight-cast
    cache (the same ops: tight; with the cache the eager block sums the controller's weight
    gradients in bf16, see test_stack_graph.py), and the cached eager block (bf16 tolerance,
    relative to the norm)."""
    st, x, V, s, mask = _setup(1, B=7, T=2 * 9)
    # uncached on both sides: with the cache, the input projection (outside the loop, used by
    # both blocks) sums its weight gradient in bf16 in one path and not the other (call S3:
    # inp.weight off by one bf16 ulp, 0.0156, when only the graphs' run had the cache)
    got = _run(st, stack_block, x, V, s, mask, autocast=True, cache=False)
    for a, b in zip(got, _run(st, _chunked_eager, x, V, s, mask, autocast=True, cache=False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    cached = _run(st, stack_block, x, V, s, mask, autocast=True)
    st.cfg.graphs = False
    for a, b in zip(got, _run(st, stack_block, x, V, s, mask, autocast=True, cache=False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(cached, _run(st, stack_block, x, V, s, mask, autocast=True)):
        assert float((a - b).norm() / b.norm().clamp(min=1e-6)) < 3e-2


def test_new_capture_while_an_earlier_block_graph_is_alive():
    """The trainer's case that failed on the device (call S1, 'operation failed due to a
    previous error during capture'): a block of one batch bucket is run (its autograd graph,
    holding the parameters' gradient accumulators, stays alive), then a block of another
    bucket captures new graphs; one backward over both."""
    st, x, V, s, mask = _setup(4, B=5, T=8)
    x2, V2, s2 = torch.randn(13, 8, 48, device="cuda"), torch.randn(13, 32, 16, device="cuda"), \
        torch.rand(13, 32, device="cuda") * 0.3
    mask2 = torch.ones(13, 8, dtype=torch.bool, device="cuda")

    def both(fn):
        xs = [t.clone().requires_grad_(True) for t in (x, V, s, x2, V2, s2)]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y1 = fn(st, xs[0], xs[1], xs[2], mask)[0]
            y2 = fn(st, xs[3], xs[4], xs[5], mask2)[0]  # bucket 16 after bucket 8
        loss = (y1.float() ** 2).sum() + (y2.float() ** 2).sum()
        return [y1.float(), y2.float()] + list(torch.autograd.grad(loss, xs))
    got = both(stack_block)
    for a, b in zip(got, both(_chunked_eager)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_graphs_reused_across_batches_and_see_parameter_updates():
    st, x, V, s, mask = _setup(2, B=6, T=8)
    _run(st, stack_block, x, V, s, mask, blocks=1)
    n = len(_CACHE[st][1])
    st2, x2, V2, s2, mask2 = _setup(3, B=3, T=8)  # another batch of the same bucket (8)
    with torch.no_grad():
        for p in st.parameters():  # an optimizer step: in place, the graphs must see it
            p.add_(torch.randn_like(p) * 0.05)
    got = _run(st, stack_block, x2, V2, s2, mask2, blocks=1)
    assert len(_CACHE[st][1]) == n  # no new capture
    for a, b in zip(got, _run(st, step_loop, x2, V2, s2, mask2, blocks=1)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the no-grad forward (evaluation) too
        for a, b in zip(stack_block(st, x2, V2, s2, mask2), step_loop(st, x2, V2, s2, mask2)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_new_stack_captures_after_an_earlier_one_was_freed():
    """Device call S2: with one pool for all stacks, freeing a stack freed its graphs and the
    pool, and the next stack's capture into the stale pool failed an allocator assertion."""
    import gc
    for seed in (5, 6):
        st, x, V, s, mask = _setup(seed, B=3, T=8)
        for a, b in zip(_run(st, stack_block, x, V, s, mask, blocks=1),
                        _run(st, step_loop, x, V, s, mask, blocks=1)):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        del st
        gc.collect()


def test_graphs_with_fused_kernels_match_the_step_loop():
    """The graphs capture the fused Triton kernels (StackConfig.fused) as well: fp32 and bf16."""
    pytest.importorskip("triton")
    st, x, V, s, mask = _setup(7, B=6, T=2 * 7)
    st.cfg.fused = True
    for a, b in zip(_run(st, stack_block, x, V, s, mask), _run(st, step_loop, x, V, s, mask)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    got = _run(st, stack_block, x, V, s, mask, autocast=True, cache=False)
    st.cfg.graphs = False
    st.cfg.fused = False
    for a, b in zip(got, _run(st, stack_block, x, V, s, mask, autocast=True, cache=False)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_capture_returns_the_cached_device_blocks():
    """A new batch size's capture (GraphRunner._capture) gives the allocator's free cached
    device blocks back to the driver (``torch.cuda.graph``'s preamble): without it (83880ab)
    the cache kept every block, fragmented, and ``small`` ran out of memory at step ~134 of a
    mixed run with 25.8 GiB reserved but free (GPU_NOTES P126-P127). Also: the graphs still
    match the step loop."""
    st, x, V, s, mask = _setup(7, B=5, T=8)
    _run(st, stack_block, x, V, s, mask, blocks=1)  # captures bucket 8
    free_block = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    del free_block  # a cached device block
    torch.cuda.synchronize()
    frees = torch.cuda.memory_stats()["num_device_free"]
    n = len(_CACHE[st][1])
    _, x2, V2, s2, mask2 = _setup(8, B=13, T=8)  # a new bucket (16): a new capture
    got = _run(st, stack_block, x2, V2, s2, mask2, blocks=1)
    assert len(_CACHE[st][1]) == n + 1
    assert torch.cuda.memory_stats()["num_device_free"] > frees  # the 64 MiB block went back
    for a, b in zip(got, _run(st, step_loop, x2, V2, s2, mask2, blocks=1)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
