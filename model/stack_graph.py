"""The stack's ponder loop over a block as replayed CUDA graphs, checkpointed per chunk.

On the GPU the eager loop (:func:`blocklm.model.stack_block.ponder_steps`) is host-bound: about
250 tiny kernel launches per decoder step, forward and backward, each with Python and autograd
overhead (~4.6 ms a step on the H200, GPU_NOTES.md call T3). Here the loop runs in chunks of
``U`` decoder steps, each chunk one replay of a captured graph:

* forward: a no-grad graph of U steps; the stack state (V, s) at the start of each chunk is
  saved (a checkpoint, [B,K,W] + [B,K] per chunk, far less than the per-step activations the
  eager autograd keeps);
* backward: for each chunk, last first, one graph that recomputes the chunk's forward with
  autograd and runs its backward (``torch.autograd.grad``) from the checkpoint and the incoming
  gradients, adding the parameter gradients into accumulators inside the graph.

The mathematics is the eager loop's: the same ops replayed (the recompute is deterministic), so
the CPU tests check the chunked, checkpointed autograd function with an eager runner in place of
the graphs (tests/model/test_stack_graph.py) and the GPU test the graphs
(tests/model/test_stack_graph_cuda.py). Graphs need static shapes: the batch is padded to a
bucket (:func:`batch_bucket`) with empty examples and the time axis to a multiple of U with
padding steps; both leave real examples' results exactly as they are (running = 0 pops and
pushes nothing). Static inputs and outputs are copied in and out around every replay (one
foreach copy each way, from and into chunk-major operands), so one
graph serves every chunk, every block and any number of forward calls before their backward
(the trainer accumulates several batches before one backward), and all graphs can share one
memory pool: nothing a graph writes in the pool is read after its replay has been copied out.

With ``StackConfig.fused_ctrl`` (the default; fp32 or bf16 autocast) the captured chunk body is
:class:`blocklm.model.stack_ctrl_loop.CtrlRunner` instead: one Triton kernel per ponder
iteration forward and one backward, no autograd inside the graphs. With its ring (the default)
the forward under grad keeps, instead of the checkpoint, each chunk's saved buffer (what the
backward kernels read; within ``StackConfig.save_bytes`` per block), and the backward runs from
it without recomputing the chunk (:func:`saves`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

from . import stack_ctrl_loop
from .stack import ProcessingStack
from .stack_runners import EagerRunner, GraphRunner, _Autocast, stack_params

__all__ = ["EagerRunner", "GraphRunner", "batch_bucket", "chunk_major", "chunked_loop",
           "eager_runner_for", "graph_runner", "stack_params", "time_major"]

# Runners (:class:`GraphRunner`: a forward and a backward graph for each kind of pair used, one
# runner per padded batch size) kept per stack, least recently used evicted first. Every capture costs the trainer's thread far more than a replay:
# two warm-up passes, and `torch.cuda.graph` synchronises the device, runs gc.collect() and empties
# the allocator's cache on entering each of the two captures. A text epoch of `small` has 16
# batch sizes (one per length bucket) and a mixed one ~25, the same every epoch: with 12 kept,
# the cyclic order made every batch capture again (`bench train --simulate`-style count, GPU_NOTES
# "Lead ... M6"). The byte cap bounds the runners' static buffers (~154 KB per padded example at
# graph_unroll 8, ~174 KB at 16: the cells and their gradient, 128 KB, do not grow with it; with
# the ring, ~190 KB more at 16 for the saved buffer).
MAX_GRAPHS = 64
MAX_GRAPH_BYTES = 8 << 30


def batch_bucket(b: int) -> int:
    """Padded batch size: a multiple of 8, above 128 of a sixteenth of the next power of two
    (under 12.5% padding from 64 up), so a few graphs serve every batch size."""
    step = max(8, (1 << max(b - 1, 1).bit_length()) >> 4)
    return -(-b // step) * step


def chunk_major(t: Tensor, U: int) -> Tensor:
    """[B, T, ...] (T a multiple of U) -> [T/U, B, U, ...] contiguous: each chunk's operand one
    dense slab, so a replay's inputs go in by one foreach copy (GraphRunner.forward_into)."""
    B, T = t.shape[:2]
    return t.reshape(B, T // U, U, *t.shape[2:]).transpose(0, 1).contiguous()


def time_major(t: Tensor) -> Tensor:
    """:func:`chunk_major`'s inverse: [n, B, U, ...] -> [B, n*U, ...] (one copy)."""
    n, B, U = t.shape[:3]
    return t.transpose(0, 1).reshape(B, n * U, *t.shape[3:])


def _forward_into(runner, e, r, V, s, outs, flat):
    """One chunk forward through ``runner``, its reads, accs and e's written into ``outs`` (and
    its saved buffer into ``flat``, when given). -> V, s after the chunk."""
    into = getattr(runner, "forward_into", None)
    if into is not None:
        return into(e, r, V, s, outs, flat)
    out = runner.forward(e, r, V, s) if flat is None else runner.forward_saved(e, r, V, s, flat)
    for dst, src in zip(outs, out[:3]):
        dst.copy_(src)
    return out[3], out[4]


def _backward_into(runner, de, r, saved, g):
    """One chunk backward through ``runner`` from ``saved`` (its saved buffer, or the
    checkpoint ``(e, V, s)``) and the output gradients ``g``; de receives the gradient of e.
    -> dV, ds at the chunk's start."""
    if isinstance(saved, Tensor):
        into = getattr(runner, "backward_saved_into", None)
        if into is not None:
            return into(r, saved, *g, de)
        de_j, g_V, g_s = runner.backward_saved(r, saved, *g)
    else:
        e, V, s = saved
        into = getattr(runner, "backward_into", None)
        if into is not None:
            return into(e, r, V, s, *g, de)
        de_j, g_V, g_s = runner.backward(e, r, V, s, *g)
    de.copy_(de_j)
    return g_V, g_s


class _Loop(torch.autograd.Function):
    """The chunked loop as one autograd node. Forward keeps, per chunk, either the runner's
    saved buffer (``save``: the backward runs no recompute) or a checkpoint of the state (the
    backward recomputes the chunk from it). Operands go through the chunks chunk-major
    ([n, B, U, ...], :func:`chunk_major`): one transposing copy per block each way instead of
    strided slices and copies per chunk."""

    @staticmethod
    def forward(ctx, runner, save, e, r, V, s, *params):
        U = runner.U
        e_c, r_c = chunk_major(e, U), chunk_major(r, U)
        read, acc, es, V, s, ck, store = run_chunks(runner, e_c, r_c, V, s, keep=not save,
                                                    save=save)
        ctx.runner, ctx.save, ctx.store = runner, save, store
        # the saved path needs only r; the recompute also e and the checkpoints
        ctx.save_for_backward(r_c, *((e_c, *ck) if ck is not None else ()))
        return time_major(read), time_major(acc), time_major(es), V, s

    @staticmethod
    def backward(ctx, g_read, g_acc, g_es, g_V, g_s):
        runner = ctx.runner  # undefined output gradients arrive as zeros (materialized)
        r_c, *rest = ctx.saved_tensors
        store = ctx.store
        if ctx.save and store is None:
            raise RuntimeError(
                "the stack's saved chunks serve one backward (their rings are turned back in "
                "place and freed); for a second backward set StackConfig.save_bytes=0")
        U = runner.U
        g_c = [chunk_major(g, U) for g in (g_read, g_acc, g_es)]
        de_c = g_es.new_empty(g_c[2].shape)  # [n, B, U, Hd]
        runner.zero_grads()
        for j in reversed(range(r_c.shape[0])):
            saved = store[j] if store is not None else (rest[0][j], rest[1][j], rest[2][j])
            g_V, g_s = _backward_into(runner, de_c[j], r_c[j], saved,
                                      (g_c[0][j], g_c[1][j], g_c[2][j], g_V, g_s))
        ctx.store = None  # free the saved chunks now, not when the autograd graph goes
        # a graph's outputs and accumulators change at its next replay: hand out copies
        return (None, None, time_major(de_c), None, g_V.clone(), g_s.clone(),
                *(g.clone() for g in runner.grads))


def run_chunks(runner, e_c, r_c, V, s, keep: bool, save: bool = False):
    """Forward over all chunks of chunk-major operands (e_c [n,B,U,Hd], r_c [n,B,U]); with
    ``keep`` also the checkpoints ([n,B,K,W], [n,B,K]), with ``save`` the runner's saved buffer
    of each chunk ([n, runner.saved_numel]). -> read, acc [n,B,U,W], es [n,B,U,Hd] (chunk-major),
    V, s, checkpoints or None, saved buffers or None."""
    n, B, U, _ = e_c.shape
    W = V.shape[-1]
    read, acc, es = e_c.new_empty(n, B, U, W), e_c.new_empty(n, B, U, W), torch.empty_like(e_c)
    ckV = V.new_empty(n, *V.shape) if keep else None
    cks = s.new_empty(n, *s.shape) if keep else None
    store = e_c.new_empty(n, runner.saved_numel(B, U)) if save else None
    for j in range(n):
        if keep:
            ckV[j], cks[j] = V, s
        # V, s: the graph's outputs, copied into its inputs before its next replay
        V, s = _forward_into(runner, e_c[j], r_c[j], V, s, (read[j], acc[j], es[j]),
                             store[j] if save else None)
    return read, acc, es, V.clone(), s.clone(), (ckV, cks) if keep else None, store


# stack -> (its graphs' memory pool, OrderedDict of runners). The pool is per stack, not global:
# once every graph captured into a pool is freed (its stack gone), PyTorch releases the pool and
# a later capture into the old handle fails an allocator assertion (device call S2)
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def use_ctrl(stack: ProcessingStack, like: Tensor, ac: _Autocast) -> bool:
    """Whether the graphs run the per-iteration kernels (``StackConfig.fused_ctrl``; fp32
    state, no autocast or bf16 autocast) rather than the eager chunk body."""
    return (stack.cfg.fused_ctrl and stack_ctrl_loop.available(like)
            and (not ac.enabled or ac.dtype == torch.bfloat16))


def graph_runner(stack: ProcessingStack, B: int, U: int, like: Tensor,
                 kind: str = "recompute") -> GraphRunner:
    """The cached :class:`GraphRunner` for (B, U, dtype, autocast, parameter storage), with its
    graph pair ``kind`` captured (:meth:`GraphRunner.ensure`)."""
    ac = _Autocast(like.device.type)
    ctrl = use_ctrl(stack, like, ac)
    key = (B, U, like.dtype, like.device, ac.key(), ctrl, ctrl and stack.cfg.ring,
           tuple(p.data_ptr() for p in stack_params(stack)))
    pools, cache, counts = _CACHE.setdefault(stack, ({}, OrderedDict(), {"captures": 0}))
    if key in cache:
        cache.move_to_end(key)
    else:
        if like.device not in pools:
            pools[like.device] = torch.cuda.graph_pool_handle()
        body = stack_ctrl_loop.CtrlRunner(stack, ac, U) if ctrl else EagerRunner(stack, ac, U)
        cache[key] = GraphRunner(body, B, U, like, pools[like.device])
    runner = cache[key]
    if runner.ensure(kind, stack):
        counts["captures"] += 1
        evict(cache, MAX_GRAPHS, MAX_GRAPH_BYTES)  # after a capture: the pool never goes unused
    return runner


def evict(cache: OrderedDict, max_n: int, max_bytes: int) -> None:
    """Drop the least recently used runners (``cache`` oldest first, each with ``nbytes``) until
    at most ``max_n`` remain and their bytes fit ``max_bytes``; the newest always stays."""
    total = sum(r.nbytes for r in cache.values())
    while len(cache) > 1 and (len(cache) > max_n or total > max_bytes):
        total -= cache.popitem(last=False)[1].nbytes


def graph_captures(stack: ProcessingStack) -> int:
    """How many graph runners this stack has captured so far (each capture stalls the host)."""
    entry = _CACHE.get(stack)
    return entry[2]["captures"] if entry is not None else 0


def chunked_loop(stack: ProcessingStack, e: Tensor, running: Tensor, V: Tensor, s: Tensor,
                 U: int, runner_for=None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The ponder loop over a block in chunks of U steps. e [B,T,Hd], running [B,T], V [B,K,W],
    s [B,K] -> reads [B,T,W], accs [B,T,W], last e's [B,T,Hd], V and s after step T.

    ``runner_for(B_pad, U, like)``: the chunk runner; None: CUDA graphs (:func:`graph_runner`).
    The batch is padded to :func:`batch_bucket` and the time axis to a multiple of U. Under grad
    the forward keeps each chunk's saved buffer where :func:`saves` allows (the backward then
    runs no recompute), else a checkpoint per chunk.
    """
    B, T, _ = e.shape
    Bp, Tp = batch_bucket(B), T + (-T % U)
    ep = F.pad(e, (0, 0, 0, Tp - T, 0, Bp - B))
    rp = F.pad(running, (0, Tp - T, 0, Bp - B))  # padded examples and steps: running = 0
    Vp, sp = F.pad(V, (0, 0, 0, 0, 0, Bp - B)), F.pad(s, (0, 0, 0, Bp - B))
    params = stack_params(stack)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in [e, V, s] + params)
    save = grad and saves(stack, Bp, Tp, U, ep)
    if runner_for is None:
        runner = graph_runner(stack, Bp, U, ep, "saved" if save else "recompute")
    else:
        runner = runner_for(Bp, U, ep)
        save = save and bool(getattr(runner, "saves", False))
    if grad:
        read, acc, es, Vn, sn = _Loop.apply(runner, save, ep, rp.detach(), Vp, sp, *params)
    else:
        read, acc, es, Vn, sn, _, _ = run_chunks(runner, chunk_major(ep, U), chunk_major(rp, U),
                                                 Vp, sp, keep=False)
        read, acc, es = time_major(read), time_major(acc), time_major(es)
    return read[:B, :T], acc[:B, :T], es[:B, :T], Vn[:B], sn[:B]


def saves(stack: ProcessingStack, B: int, T: int, U: int, like: Tensor) -> bool:
    """Whether a block's forward keeps its chunks' saved buffers: the per-iteration kernels with
    the ring (:func:`use_ctrl`, ``StackConfig.ring``), and the buffers (B padded examples, T
    padded steps) within ``StackConfig.save_bytes``."""
    cfg = stack.cfg
    if not (cfg.ring and use_ctrl(stack, like, _Autocast(like.device.type))):
        return False
    nbytes = (T // U) * stack_ctrl_loop.saved_numel(cfg, B, U) * like.element_size()
    return nbytes <= cfg.save_bytes


def eager_runner_for(stack: ProcessingStack):
    """A ``runner_for`` of eager chunk runners (CPU tests; also works on CUDA, ungraphed)."""
    return lambda B, U, like: EagerRunner(stack, _Autocast(like.device.type), U)
