"""The processing stack over a whole block: time-parallel parts batched, the recurrence compiled.

Of the stack's step (:class:`blocklm.model.stack.ProcessingStack`) only the ponder loop reads the
stack state; the input embedding (``embed``) and the output projection (``output``) do not, so a
block computes them for all its steps in one matmul each. The ponder loop stays a step recurrence
(T steps x ``max_steps`` iterations of small ops on [B,K,W]): eager on the GPU that is dozens of
kernel launches per step, forward and backward, which made the stack cost far more than the
rest of the model. On CUDA the loop runs ``UNROLL`` steps per call of a ``torch.compile``d
function, so Inductor fuses each unrolled chunk's element-wise work into a few kernels; the
mathematics is the same (the eager CPU path is the reference, see tests/model/test_stack_block.py).

The time axis is padded to a multiple of ``UNROLL`` with padding steps (running = 0): a padding
step pops and pushes exactly nothing, so the stack passes through it unchanged, as it does for
masked steps inside a block; the padded outputs are dropped. This keeps one compiled graph for
every block length (the batch dimension is dynamic).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import stack_fused  # the fused kernels (CUDA + triton), StackConfig.fused
from .stack import ProcessingStack

UNROLL = 2  # decoder steps per compiled call: 8 took 4+ minutes to compile on the device (T1)

_COMPILED: dict[str, Callable] = {}  # backend -> compiled ponder_steps (compiled once, lazily)


def ponder_steps(stack: ProcessingStack, e: Tensor, running: Tensor, V: Tensor, s: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """U consecutive ponder loops. e [B,U,Hd], running [B,U], V [B,K,W], s [B,K] -> final reads
    [B,U,W], accumulated outputs [B,U,W], last embeddings [B,U,Hd], new V, new s."""
    # not inside torch.compile (the compiled path traces the eager ops)
    fused = stack.cfg.fused and stack_fused.available(V) and not torch.compiler.is_compiling()
    reads, accs, es = [], [], []
    for u in range(e.shape[1]):
        if fused:
            read, acc, eu, V, s = stack_fused.ponder_fused(stack, e[:, u], V, s, running[:, u])
        else:
            read, acc, eu, V, s, _ = stack.ponder(e[:, u], V, s, running[:, u], stats=False)
        reads.append(read)
        accs.append(acc)
        es.append(eu)
    return torch.stack(reads, 1), torch.stack(accs, 1), torch.stack(es, 1), V, s


def compiled_ponder_steps(backend: str = "inductor") -> Callable:
    """:func:`ponder_steps` through ``torch.compile`` (dynamic batch), built once per backend."""
    fn = _COMPILED.get(backend)
    if fn is None:
        fn = _COMPILED[backend] = torch.compile(ponder_steps, backend=backend, dynamic=True)
    return fn


def stack_block(stack: ProcessingStack, x: Tensor, V: Tensor, s: Tensor,
                mask: Tensor | None = None, backend: str | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
    """The stack over a block. x [B,T,d_model], V [B,K,W], s [B,K], mask [B,T] (True: real step)
    -> outputs [B,T,d_model], V and s after the last step.

    ``backend``: the ``torch.compile`` backend of the step loop; None picks, for CUDA tensors,
    CUDA graphs (``stack.cfg.graphs``, stack_graph.py) or "inductor" (``stack.cfg.compile``),
    else eager (the CPU reference path).
    """
    B, T, _ = x.shape
    e = stack.embed(x)  # [B,T,Hd] all steps at once
    running = s.new_ones(B, T) if mask is None else mask.to(s.dtype)  # [B,T]
    if backend is None and x.is_cuda and stack.cfg.graphs and T > 0:
        from .stack_graph import chunked_loop  # CUDA graphs of the loop (stack_graph.py)
        read, acc, e, V, s = chunked_loop(stack, e, running, V, s, stack.cfg.graph_unroll)
        return stack.output(read, acc, e), V, s
    if backend is None and x.is_cuda and stack.cfg.compile:
        backend = "inductor"
    if backend is None:
        fn, U = ponder_steps, UNROLL
    else:
        fn, U = compiled_ponder_steps(backend), UNROLL
        pad = -T % U  # padding steps change nothing (see the module docstring)
        e, running = F.pad(e, (0, 0, 0, pad)), F.pad(running, (0, pad))
    reads, accs, es = [], [], []
    for t0 in range(0, e.shape[1], U):
        r, a, ee, V, s = fn(stack, e[:, t0:t0 + U], running[:, t0:t0 + U], V, s)
        reads.append(r)
        accs.append(a)
        es.append(ee)
    read, acc, e = (torch.cat(p, 1)[:, :T] for p in (reads, accs, es))
    return stack.output(read, acc, e), V, s  # [B,T,d_model]
