"""The chunked, checkpointed stack loop (stack_graph.py) against the step-by-step reference.

On the CPU the chunk runner is eager (the graphs capture the same two chunk functions; their GPU
test is test_stack_graph_cuda.py): this checks the autograd function, the checkpoints, the
recompute in backward, the batch and time padding and the state carried between blocks.
"""

from __future__ import annotations

import pytest
import torch

from blocklm.model.config import StackConfig
from blocklm.model.stack import ProcessingStack, step_loop
from blocklm.model.stack_block import stack_block
from blocklm.model.stack_graph import batch_bucket, chunked_loop, eager_runner_for


def _setup(seed=0, B=3, T=11, d=6, K=5):
    torch.manual_seed(seed)
    st = ProcessingStack(StackConfig(depth=K, width=4, hidden=8, max_steps=2), d)
    x = torch.randn(B, T, d) * 2
    V = torch.randn(B, K, 4)
    s = torch.rand(B, K) * 0.5
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 7:] = False  # a shorter example: padding at its end
    return st, x, V, s, mask


def _chunked(U):
    def fn(st, x, V, s, mask):
        e = st.embed(x)
        read, acc, es, V, s = chunked_loop(st, e, mask.to(s.dtype), V, s, U, eager_runner_for(st))
        return st.output(read, acc, es), V, s
    return fn


def _two_blocks(fn, st, x, V, s, mask):
    """Two blocks in a row, the second starting from the first's state (the trainer's case:
    both forwards run before one backward)."""
    T = x.shape[1] // 2
    y1, V, s = fn(st, x[:, :T], V, s, mask[:, :T])
    y2, V, s = fn(st, x[:, T:], V, s, mask[:, T:])
    return torch.cat([y1, y2], 1), V, s


def _grads(st, fn, x, V, s, mask):
    xs = [t.clone().requires_grad_(True) for t in (x, V, s)]
    y, V2, s2 = fn(st, *xs, mask)
    gen = torch.Generator().manual_seed(1)
    w = [torch.randn(t.shape, generator=gen) for t in (y, V2, s2)]
    loss = sum((a.float() * b).sum() for a, b in zip((y, V2, s2), w))
    return (y, V2, s2), torch.autograd.grad(loss, xs + list(st.parameters()), allow_unused=True)


@pytest.mark.parametrize("U", [1, 3, 4])
def test_chunked_loop_equals_step_loop_values_and_gradients(U):
    """T=11 is no multiple of 3 or 4 (time padding), B=3 pads to 8 examples (batch padding)."""
    st, x, V, s, mask = _setup()
    ref_out, ref_g = _grads(st, step_loop, x, V, s, mask)
    out, g = _grads(st, _chunked(U), x, V, s, mask)
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_state_carried_across_blocks_values_and_gradients():
    st, x, V, s, mask = _setup(seed=3, T=14)
    mask[2, 5:] = False  # ends inside the first block: the second block is all padding for it
    ref_out, ref_g = _grads(st, lambda *a: _two_blocks(step_loop, *a), x, V, s, mask)
    out, g = _grads(st, lambda *a: _two_blocks(_chunked(3), *a), x, V, s, mask)
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_autocast_is_reentered_in_the_recompute():
    """Under bf16 autocast the recompute in backward must run the controller in bf16 as the
    forward did (a recompute in fp32 would differ by bf16 rounding, ~1e-2). The reference is the
    eager block under autocast without the weight-cast cache, as the chunks run: with the cache,
    every step's bf16 weight gradient sums in bf16 into one cast (the controller's gradients
    differ by ~3e-2 there, and the chunked sums, per step in fp32, are the closer to fp32)."""
    st, x, V, s, mask = _setup(seed=4, B=4, K=16)

    def under_autocast(fn):
        def run(*a):
            with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
                return fn(*a)
        return run
    ref_out, ref_g = _grads(st, under_autocast(stack_block), x, V, s, mask)
    out, g = _grads(st, under_autocast(_chunked(4)), x, V, s, mask)
    fp32_g = _grads(st, stack_block, x, V, s, mask)[1]
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert max(float((a - b).abs().max()) for a, b in zip(g, fp32_g)) > 1e-3  # bf16 ran


def test_no_grad_forward_equals_reference():
    st, x, V, s, mask = _setup(seed=5)
    with torch.no_grad():
        ref = step_loop(st, x, V, s, mask)
        out = _chunked(4)(st, x, V, s, mask)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _Saving:
    """An eager runner with the saved-buffer interface (CtrlRunner's with the ring, which needs
    Triton): its buffer holds the chunk's inputs (e, V, s) and the chunk's serial number, and
    its backward runs from the buffer alone (plus r). So the test sees which chunk's buffer each
    backward got, and that no checkpoint is used."""

    saves = True

    def __init__(self, st, U):
        from blocklm.model.stack_graph import EagerRunner, _Autocast
        self.inner = EagerRunner(st, _Autocast("cpu"), U)
        self.U, self.grads, self.zero_grads = U, self.inner.grads, self.inner.zero_grads
        self.n, self.got, self.recomputes = 0, [], 0
        self.forward = None  # the saved path must not call the plain forward
        self.K, self.W, self.Hd = st.cfg.depth, st.cfg.width, st.cfg.hidden

    def saved_numel(self, B, U):
        return B * U * self.Hd + B * self.K * self.W + B * self.K + 1

    def _split(self, flat, B, U):
        a, b = B * U * self.Hd, B * self.K * self.W
        return (flat[:a].view(B, U, self.Hd), flat[a:a + b].view(B, self.K, self.W),
                flat[a + b:-1].view(B, self.K), flat[-1])

    def forward_saved(self, e, r, V, s, flat):
        ef, Vf, sf, serial = self._split(flat, *e.shape[:2])
        ef.copy_(e), Vf.copy_(V), sf.copy_(s), serial.fill_(self.n)
        self.n += 1
        return self.inner.forward(e, r, V, s)

    def backward_saved(self, r, flat, *g):
        e, V, s, serial = self._split(flat, *r.shape)
        self.got.append(int(serial))
        return self.inner.backward(e, r, V, s, *g)

    def backward(self, *a):
        self.recomputes += 1
        return self.inner.backward(*a)


def test_loop_backward_from_saved_buffers():
    """``_Loop`` with ``save``: each chunk's buffer goes to that chunk's backward (last first),
    the checkpoints are not kept, values and gradients are the step loop's; a second backward
    through the same graph is refused (the buffers were turned and freed)."""
    from blocklm.model.stack_graph import _Loop, stack_params
    st, x, V, s, mask = _setup(seed=6, B=4, T=12)
    runner = _Saving(st, 4)

    def saved(st, x, V, s, mask):
        e = st.embed(x)
        read, acc, es, V, s = _Loop.apply(runner, True, e, mask.to(s.dtype), V, s,
                                          *stack_params(st))
        return st.output(read, acc, es), V, s
    ref_out, ref_g = _grads(st, step_loop, x, V, s, mask)
    out, g = _grads(st, saved, x, V, s, mask)
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert runner.got == [2, 1, 0] and runner.recomputes == 0
    y = saved(st, x, V, s.requires_grad_(True), mask)[0]
    y.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        y.sum().backward()


def test_batch_bucket_pads_little_and_to_few_sizes():
    sizes = {batch_bucket(b) for b in range(1, 1025)}
    assert len(sizes) <= 48
    for b in range(1, 1025):
        p = batch_bucket(b)
        assert p >= b and p % 8 == 0 and (b < 64 or p < b * 1.125)


class _Runner:
    def __init__(self, nbytes):
        self.nbytes = nbytes


def _captures(keys, max_n, max_bytes=1 << 60, nbytes=1):
    """Captures (cache misses) of graph_runner's policy over a sequence of padded batch sizes."""
    from collections import OrderedDict

    from blocklm.model.stack_graph import evict
    cache, n = OrderedDict(), 0
    for k in keys:
        if k in cache:
            cache.move_to_end(k)
            continue
        n += 1
        cache[k] = _Runner(nbytes)
        evict(cache, max_n, max_bytes)
    return n


def test_an_epochs_batch_sizes_are_captured_once():
    """The `small` text epoch's 16 padded batch sizes (one per length bucket, the same every
    epoch; a mixed epoch has ~25), three epochs in a cyclic order: each size is captured once.
    With the old cap of 12 every batch captured again (48 captures), and each capture
    synchronises the device and runs gc.collect() in the trainer's thread."""
    from blocklm.model.stack_graph import MAX_GRAPHS
    sizes = [40, 72, 88, 120, 144, 176, 208, 240, 288, 352, 416, 576, 704, 832, 1152, 2048]
    assert _captures(sizes * 3, 12) == 48
    assert _captures(sizes * 3, MAX_GRAPHS) == 16
    mixed = [batch_bucket(b) for b in range(10, 1400, 41)]  # 34 sizes
    assert _captures(mixed * 3, MAX_GRAPHS) == len(set(mixed))


def test_eviction_keeps_the_newest_and_respects_the_byte_cap():
    from collections import OrderedDict

    from blocklm.model.stack_graph import evict
    cache = OrderedDict((k, _Runner(10)) for k in range(5))
    evict(cache, 3, 1 << 60)
    assert list(cache) == [2, 3, 4]
    evict(cache, 10, 15)  # bytes: only the newest fits
    assert list(cache) == [4]
    cache[5] = _Runner(100)  # larger than the cap alone: still kept (it was just captured)
    evict(cache, 10, 15)
    assert list(cache) == [5]


def test_one_launch_per_chunk_only_where_the_batch_fits_the_sms(monkeypatch):
    """``StackConfig.persistent``: a chunk runs as one launch where its programs (one per
    example) fit the GPU's SMs (a batch of more runs in waves, slower: GPU_NOTES P37), per
    iteration otherwise and with the option off; every batch on the CPU (the interpreter)."""
    from types import SimpleNamespace

    from blocklm.model.stack_ctrl_loop import CtrlRunner
    from blocklm.model.stack_runners import _Autocast

    def runner(**kw):
        st = ProcessingStack(StackConfig(depth=4, width=4, hidden=8, **kw), 8)
        return CtrlRunner(st, _Autocast("cpu"), 4)

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(multi_processor_count=132))

    def on_gpu(B):
        return SimpleNamespace(is_cuda=True, shape=(B, 16, 8), device="cuda:0")

    r = runner()
    assert r.persistent
    assert r._one_launch(on_gpu(20)) and r._one_launch(on_gpu(132))
    assert not r._one_launch(on_gpu(133)) and not r._one_launch(on_gpu(300))
    assert r._one_launch(torch.zeros(300, 16, 8))
    assert not runner(persistent=False)._one_launch(on_gpu(20))
    assert not runner(ring=False)._one_launch(on_gpu(20))


class _Replay:
    """A CUDA graph's stand-in on the CPU: replay() runs the captured function again and writes
    its results into the outputs the capture returned (what a graph replay does to its static
    outputs). ``live`` counts replays so the op counter can leave the graph's own ops out."""

    def __init__(self, fn, out, stack, body, live):
        self.fn, self.out, self.stack, self.body, self.live = fn, out, stack, body, live

    def replay(self):
        from blocklm.model.stack_runners import EagerRunner, _Ponder
        self.live[0] += 1
        self.body.stack = self.stack  # the runner lets go of it between captures
        if isinstance(self.body, EagerRunner):
            self.body.ponder = _Ponder(self.stack)
        for dst, src in zip(self.out, self.fn()):
            dst.copy_(src)
        self.live[0] -= 1


def _fake_graph_runner(body, B, U, like, live):
    """A GraphRunner whose graphs are :class:`_Replay` stand-ins (CPU): the runner's own copies
    in and out of the static buffers run exactly as on the GPU."""
    from blocklm.model.stack_runners import GraphRunner

    class Fake(GraphRunner):
        def _capture(self, fns):
            stack = self.body.stack
            pair = []
            for fn in fns:
                out = [t.clone() for t in fn()]  # the static outputs
                pair.append((_Replay(fn, out, stack, self.body, live), out))
            return tuple(pair)
    return Fake(body, B, U, like, None)


class _CountCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the copy ops the host issues outside a graph's replay."""

    def __init__(self, live):
        super().__init__()
        self.live, self.ops = live, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.live[0] == 0 and func.overloadpacket in (torch.ops.aten.copy_,
                                                         torch.ops.aten._foreach_copy_):
            self.ops.append(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("saving", [False, True])
def test_graph_runner_copies_match_the_step_loop_in_two_foreach_ops_a_chunk(saving):
    """GraphRunner's copies into and out of its static buffers (graphs replaced by a CPU
    stand-in): values and gradients are the step loop's, through the recompute pair and the
    saved pair; and a chunk's copies are one foreach op in and one out forward, one in and one
    copy of de out backward, plus a few per block (before: ~8 copy ops a chunk each way, the
    host time of GPU_NOTES P69)."""
    from blocklm.model.stack_graph import _Loop, stack_params
    from blocklm.model.stack_runners import EagerRunner, _Autocast
    st, x, V, s, mask = _setup(seed=7, B=8, T=12)
    U, live = 3, [0]

    def body():
        if not saving:
            return EagerRunner(st, _Autocast("cpu"), U)
        b = _Saving(st, U)
        b.stack = st
        return b
    runner = _fake_graph_runner(body(), 8, U, x.new_zeros(1), live)
    runner.ensure("saved" if saving else "recompute", st)

    def graphed(st, x, V, s, mask):
        e = st.embed(x)
        read, acc, es, V, s = _Loop.apply(runner, saving, e, mask.to(s.dtype), V, s,
                                          *stack_params(st))
        return st.output(read, acc, es), V, s
    ref_out, ref_g = _grads(st, step_loop, x, V, s, mask)
    counter = _CountCopies(live)
    with counter:
        out, g = _grads(st, graphed, x, V, s, mask)
    for a, b in zip(out + g, ref_out + ref_g):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    n = 12 // U
    foreach = counter.ops.count(torch.ops.aten._foreach_copy_)
    assert foreach == 3 * n  # two a chunk forward, one a chunk backward
    # de out of each chunk's backward, plus the per-block layout changes (chunk-major and back)
    assert counter.ops.count(torch.ops.aten.copy_) <= n + 8
