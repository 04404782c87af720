"""The chunk runners of the stack's graphs (stack_graph.py): a chunk of U decoder steps forward,
and its backward, run eagerly (:class:`EagerRunner`, the CPU path and the body the graphs capture
without ``fused_ctrl``) or as captured CUDA graphs of a body (:class:`GraphRunner`; the body can
also be :class:`blocklm.model.stack_ctrl_loop.CtrlRunner`)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .stack import ProcessingStack
from .stack_block import ponder_steps


def stack_params(stack: ProcessingStack) -> list[Tensor]:
    """The parameters the ponder loop reads (the embedding and output projections run outside)."""
    return [stack.ctrl.weight, stack.ctrl.bias, stack.act.weight, stack.act.bias,
            stack.val.weight, stack.val.bias]


class _Autocast:
    """The caller's autocast state, re-entered (without the weight-cast cache, which a graph
    must not capture) for the recompute in backward and for graph capture."""

    def __init__(self, device_type: str) -> None:
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled,
                              cache_enabled=False)

    def key(self) -> tuple:
        return (self.enabled, self.dtype if self.enabled else None)


class _Ponder(nn.Module):
    """:func:`ponder_steps` as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, stack: ProcessingStack) -> None:
        super().__init__()
        self.stack = stack

    def forward(self, e, r, V, s):
        return ponder_steps(self.stack, e, r, V, s)


class EagerRunner:
    """One chunk forward / recompute+backward with eager ops (the CPU path of the tests, and the
    body every :class:`GraphRunner` captures)."""

    def __init__(self, stack: ProcessingStack, autocast: _Autocast, U: int) -> None:
        self.stack, self.autocast, self.U = stack, autocast, U
        self.ponder = _Ponder(stack)
        name_of = {id(p): n for n, p in self.ponder.named_parameters()}
        self.names = [name_of[id(p)] for p in stack_params(stack)]
        self.grads = [torch.zeros_like(p) for p in stack_params(stack)]

    def zero_grads(self) -> None:
        for g in self.grads:
            g.zero_()

    def forward(self, e, r, V, s):
        """e [B,U,Hd], r [B,U], V [B,K,W], s [B,K] -> reads, accs, last e's, V, s (no grad)."""
        with torch.no_grad(), self.autocast():
            return ponder_steps(self.stack, e, r, V, s)

    def backward(self, e, r, V, s, g_read, g_acc, g_e, g_V, g_s):
        """Recompute the chunk from its checkpoint and back-propagate: -> de [B,U,Hd], dV, ds
        at the chunk's start; parameter gradients are added to ``self.grads``."""
        # differentiate w.r.t. fresh aliases of the parameters (same storage), not the
        # parameters: a parameter's gradient accumulator node, once created on the default
        # stream by the autograd graph of an earlier block still alive, would make this capture
        # wait on the default stream and invalidate it (the trainer's case, device call S1)
        params = [p.detach().requires_grad_(True) for p in stack_params(self.stack)]
        with torch.enable_grad(), self.autocast():
            xs = [t.detach().requires_grad_(True) for t in (e, V, s)]
            outs = functional_call(self.ponder, dict(zip(self.names, params)),
                                   (xs[0], r, xs[1], xs[2]))
            gs = torch.autograd.grad(outs, xs + params, (g_read, g_acc, g_e, g_V, g_s),
                                     allow_unused=True, materialize_grads=True)
        torch._foreach_add_(self.grads, list(gs[3:]))
        return gs[0], gs[1], gs[2]


class GraphRunner:
    """A chunk runner's functions (``body``: an :class:`EagerRunner`, or a
    :class:`blocklm.model.stack_ctrl_loop.CtrlRunner`) captured as CUDA graphs for one static
    shape (B padded, U); static inputs are copied in before and outputs used right after a
    replay. Graphs are captured in pairs on first use (:meth:`ensure`): "recompute" (forward
    without grad; backward recomputing from the checkpoint) and, where the body ``saves``,
    "saved" (forward keeping the chunk's saved buffer; backward from it)."""

    def __init__(self, body, B, U, like: Tensor, pool) -> None:
        self.U, self.grads, self.zero_grads = U, body.grads, body.zero_grads
        self.body, self.pool, self.B = body, pool, B
        self.saves = bool(getattr(body, "saves", False))
        cfg = body.stack.cfg
        K, W, Hd = cfg.depth, cfg.width, cfg.hidden
        z = lambda *shape: torch.zeros(*shape, device=like.device, dtype=like.dtype)  # noqa: E731
        self.inp = [z(B, U, Hd), z(B, U), z(B, K, W), z(B, K)]  # e, running, V, s
        self.gin = [z(B, U, W), z(B, U, W), z(B, U, Hd), z(B, K, W), z(B, K)]
        self.flat = z(body.saved_numel(B, U)) if self.saves else None
        self.graphs: dict[str, tuple] = {}  # name -> (graph, its outputs)
        # the cache is keyed weakly on the stack: a runner holding it would keep it alive
        body.stack = None
        if isinstance(body, EagerRunner):
            body.ponder = None
        self.nbytes = sum(t.numel() * t.element_size()
                          for t in self.inp + self.gin + ([self.flat] if self.saves else []))

    def ensure(self, kind: str, stack: ProcessingStack) -> bool:
        """Capture the pair ``kind`` ("recompute" or "saved") unless it is there; -> whether
        this call captured (which stalls the host: two warm-up passes, a device sync)."""
        if kind in self.graphs:
            return False
        body = self.body
        body.stack = stack
        if isinstance(body, EagerRunner):
            body.ponder = _Ponder(stack)
        if kind == "saved":
            fns = (lambda: body.forward_saved(*self.inp, self.flat),
                   lambda: body.backward_saved(self.inp[1], self.flat, *self.gin))
        else:
            fns = (lambda: body.forward(*self.inp), lambda: body.backward(*self.inp, *self.gin))
        self.graphs[kind] = self._capture(fns)
        body.stack = None
        if isinstance(body, EagerRunner):
            body.ponder = None
        return True

    def _capture(self, fns) -> tuple:
        """Warm ``fns`` up on a side stream, then capture each: -> ((graph, its outputs), ...)."""
        like = self.inp[0]
        side = torch.cuda.Stream(like.device)
        side.wait_stream(torch.cuda.current_stream(like.device))
        with torch.cuda.stream(side):  # warm-up (cuBLAS handles, workspaces, Triton builds)
            for _ in range(2):
                for fn in fns:
                    fn()
        torch.cuda.current_stream(like.device).wait_stream(side)
        pair = []
        for fn in fns:
            g = torch.cuda.CUDAGraph()
            # thread_local: the loader's threads may call CUDA while this thread captures.
            # torch.cuda.graph, not capture_begin alone: its preamble empties the allocator's
            # device cache, and these captures (each new padded batch size, on through a run as
            # the LRU evicts) are what keeps a long run's cache from fragmenting. Without it
            # (83880ab) ``small`` ran out of memory at step ~134 on mixed data with 25.8 GiB
            # reserved but free (GPU_NOTES P126-P130); its churn did not show in throughput (P122)
            with torch.cuda.graph(g, pool=self.pool, capture_error_mode="thread_local"):
                out = fn()
            pair.append((g, out))
        return tuple(pair)

    # A replay's static inputs are filled, and its outputs taken out, by one foreach copy each
    # (a single multi-tensor launch where the operands are dense and alike, as the chunk-major
    # operands of stack_graph.run_chunks are): the per-operand copies and slices this replaced
    # were ~16 host ops a chunk, 460 of the autograd thread's 2,983 py-spy samples in a mixed
    # step's window (GPU_NOTES.md call P69).
    def forward_into(self, e, r, V, s, outs, flat=None):
        """One chunk forward: e [B,U,Hd], r [B,U], V [B,K,W], s [B,K] in; the chunk's reads,
        accs and last e's copied into ``outs`` (and with ``flat`` its saved buffer, the "saved"
        pair). -> V, s after the chunk: the graph's outputs, valid until its next replay."""
        kind = "recompute" if flat is None else "saved"
        g, out = self.graphs[kind][0]
        torch._foreach_copy_(self.inp, [e, r, V, s])
        g.replay()
        if flat is None:
            torch._foreach_copy_(list(outs), list(out[:3]))
        else:
            torch._foreach_copy_([*outs, flat], [*out[:3], self.flat])
        return out[3], out[4]

    def backward_into(self, e, r, V, s, g_read, g_acc, g_e, g_V, g_s, de):
        """One chunk backward recomputing from its checkpoint (V, s at its start); de [B,U,Hd]
        receives the gradient of e. -> dV, ds at the chunk's start (valid until the next
        replay)."""
        g, out = self.graphs["recompute"][1]
        torch._foreach_copy_(self.inp + self.gin, [e, r, V, s, g_read, g_acc, g_e, g_V, g_s])
        g.replay()
        de.copy_(out[0])
        return out[1], out[2]

    def backward_saved_into(self, r, flat, g_read, g_acc, g_e, g_V, g_s, de):
        """One chunk backward from the saved buffer its forward kept, as :meth:`backward_into`."""
        g, out = self.graphs["saved"][1]
        torch._foreach_copy_([self.inp[1], self.flat] + self.gin,
                             [r, flat, g_read, g_acc, g_e, g_V, g_s])
        g.replay()
        de.copy_(out[0])
        return out[1], out[2]

    def saved_numel(self, B: int, U: int) -> int:
        return self.flat.numel()
