"""The differentiable processing stack (design note 003), part of the recurrent state.

Reading of the design. 003 describes a loop "read a superposition from the stack, compute, update
the stack (push / pop / no-op), accumulate into the output whatever mass leaves the stack,
ACT-style, until the stack is empty". For the stack to help on problems such as string reversal
or Dyck languages it must *carry information across time steps* (the continuous stacks of
Joulin & Mikolov 2015 and Grefenstette et al. 2015 are the known working recipe). So here:

* The stack is a fixed number K of cells (contents ``V`` [B, K, W] and explicit per-cell
  strengths ``s`` [B, K] in [0, 1], cell 0 is the top) that lives in the decoder's recurrent
  state and so is handed from step to step and from block to block.
* Each decoder step runs the 003 loop for at most ``max_steps`` ponder iterations. An iteration
  reads the superposition of the top unit of mass (Grefenstette's read:
  ``sum_i min(s_i, relu(1 - sum_{j above i} s_j)) V_i``), computes a new embedding from the
  previous one and the read, chooses push / pop / no-op probabilities, pops ``pop`` units of mass
  from the top (the top cells lose strength first), then pushes a new cell of strength ``push``.
* Mass that leaves through the top is accumulated into the step's output, weighted by the mass
  (ACT-style output accumulation); at most one unit may leave per decoder step (ACT's remainder:
  the last pop is clipped to what is left of the unit). The loop stops once the mass that left
  reaches ``1 - epsilon`` or after ``max_steps`` iterations (both configurable).
* Mass is explicit and conserved: stack mass + mass that fell off (popped at the top, or the
  strength of the bottom cell when a push shifts it past cell K) = initial mass + pushed mass;
  for a stack holding one unit and no pushes, stack + fallen-off = 1. Every non-zero push takes
  a cell, however weak, so K bounds how many pushes back the stack can remember.
* 003 keeps both the embeddings and the memories in stacks; here the stack cells are
  embedding-width vectors and the bank memories (D x D per head and bank) are not stacked, which
  would multiply the state by K. The banks keep the long-range content, the stack the nesting.

The step output is a projection of (final read, accumulated popped content, last embedding).
All stack arithmetic is fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import upcast
from .config import StackConfig


def mass_above(s: Tensor) -> Tensor:
    """Mass strictly above each cell: s [B,K] -> [B,K]."""
    return s.cumsum(-1) - s


def stack_read(V: Tensor, s: Tensor, above: Tensor | None = None) -> Tensor:
    """Superposition of the top unit of mass. V [B,K,W], s [B,K] -> [B,W]. ``above``:
    :func:`mass_above` of ``s`` when the caller has it already."""
    above = mass_above(s) if above is None else above
    weight = torch.minimum(s, F.relu(1.0 - above))
    return (weight[..., None] * V).sum(1)


def stack_pop(s: Tensor, u: Tensor, above: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Remove ``u`` [B] units of mass from the top. Returns new strengths and popped mass [B,K]."""
    above = mass_above(s) if above is None else above
    new = F.relu(s - F.relu(u[:, None] - above))
    return new, s - new


def stack_push(V: Tensor, s: Tensor, v: Tensor, d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Push cell ``v`` [B,W] with strength ``d`` [B]; the bottom cell falls off.

    A push of strength exactly 0 is skipped (a zero-strength cell reads and pops as nothing), so
    padding steps and halted iterations use no cell; every other push uses one of the K cells.

    Returns new V, new s and the strength that fell off the bottom [B].
    """
    keep = (d > 0)[:, None]  # a push of exactly zero (padding, halted) keeps the cells in place
    V = torch.where(keep[..., None], torch.cat([v[:, None].to(V.dtype), V[:, :-1]], dim=1), V)
    fallen = torch.where(keep[:, 0], s[:, -1], torch.zeros_like(d))
    s = torch.where(keep, torch.cat([d[:, None], s[:, :-1]], dim=1), s)
    return V, s, fallen


@dataclass
class StackStats:
    """Mass bookkeeping of one decoder step (all [B])."""

    pushed: Tensor
    popped: Tensor  # left through the top, accumulated into the output
    overflow: Tensor  # pushed out at the bottom
    iterations: Tensor  # ponder iterations each example ran before it stopped


class ProcessingStack(nn.Module):
    """Stack controller + the 003 ponder loop on a stack held in the state."""

    def __init__(self, cfg: StackConfig, d_model: int) -> None:
        super().__init__()
        self.cfg = cfg
        W, Hd = cfg.width, cfg.hidden
        self.inp = nn.Linear(d_model, Hd)
        self.ctrl = nn.Linear(Hd + W, Hd)
        self.act = nn.Linear(Hd, 3)  # logits of push, pop, no-op
        self.val = nn.Linear(Hd, W)
        self.out = nn.Linear(2 * W + Hd, d_model)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shapes of the stack state (fp32)."""
        return {"V": (self.cfg.depth, self.cfg.width), "s": (self.cfg.depth,)}

    def embed(self, x: Tensor) -> Tensor:
        """x [..., d_model] -> the embedding being processed [..., Hd] (fp32). It reads no state,
        so a block computes it for all its steps in one call."""
        return torch.tanh(upcast(self.inp(x)))

    def output(self, read: Tensor, acc: Tensor, e: Tensor) -> Tensor:
        """Final read [..., W], accumulated popped content [..., W], last embedding [..., Hd] ->
        the step output [..., d_model]. Reads no state either (one call per block)."""
        return self.out(torch.cat([read, acc, e.to(read.dtype)], -1))

    def ponder(self, e: Tensor, V: Tensor, s: Tensor, running: Tensor,
               actions: Tensor | None = None, stats: bool = True
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, StackStats | None]:
        """The 003 loop of one decoder step: the only part that is a recurrence.

        e [B,Hd] (from :meth:`embed`), V [B,K,W], s [B,K], running [B] (1 real step, 0 padding)
        -> final read [B,W], accumulated output [B,W], last e [B,Hd], new V, new s, stats
        (None with ``stats=False``: the block path skips the bookkeeping; on the GPU every
        op here is a kernel launch per step, forward and backward).
        """
        left = s.new_zeros(e.shape[0])  # mass that left through the top in this step
        acc = V.new_zeros(e.shape[0], self.cfg.width)
        if stats:
            pushed, overflow, iterations = (torch.zeros_like(left) for _ in range(3))
        # Always max_steps iterations: a stopped example's actions are exactly 0, which leaves
        # its stack as it is, so no host sync (`running.any()`) is needed to break early.
        for it in range(1, self.cfg.max_steps + 1):
            if stats:
                iterations = iterations + running
            above = mass_above(s)  # read and pop see the same s: computed once
            read = stack_read(V, s, above)  # [B,W]
            e_new = torch.tanh(upcast(self.ctrl(torch.cat([e, read.to(e.dtype)], -1))))  # [B,Hd]
            e = torch.where(running[:, None] > 0, e_new, e)  # a stopped example keeps its e
            p = upcast(self.act(e_new)).softmax(-1) if actions is None else actions[:, it - 1]
            push = p[:, 0] * running
            pop = torch.minimum(p[:, 1] * running, 1.0 - left)  # ACT remainder
            s, popped = stack_pop(s, pop, above)
            acc = acc + (popped[..., None] * V).sum(1)
            left = left + popped.sum(-1)
            V, s, fell = stack_push(V, s, torch.tanh(upcast(self.val(e_new))), push)
            if stats:
                pushed, overflow = pushed + push, overflow + fell
            running = running * (left < 1.0 - self.cfg.epsilon).to(s.dtype)
        st = StackStats(pushed, left, overflow, iterations) if stats else None
        return stack_read(V, s), acc, e, V, s, st

    def step(self, x: Tensor, V: Tensor, s: Tensor, mask: Tensor | None = None,
             actions: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, StackStats]:
        """One decoder step. x [B,d_model] -> y [B,d_model], new V, new s, mass stats.

        ``mask`` [B] (False: padding, the stack is left as it is). ``actions`` [B,max_steps,3]
        overrides the controller's (push, pop, no-op) probabilities (tests, analysis).
        """
        running = s.new_ones(x.shape[0]) if mask is None else mask.to(s.dtype)
        read, acc, e, V, s, stats = self.ponder(self.embed(x), V, s, running, actions)
        return self.output(read, acc, e), V, s, stats


def step_loop(stack: ProcessingStack, x: Tensor, V: Tensor, s: Tensor,
              mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The step form over a block, one :meth:`ProcessingStack.step` per time step: the reference
    every block path (:func:`blocklm.model.stack_block.stack_block`, graphs, fused kernels) is
    tested against. Same arguments and results as ``stack_block``: x [B,T,d_model], V [B,K,W],
    s [B,K], mask [B,T] -> outputs [B,T,d_model], V and s after the last step."""
    ys = []
    for t in range(x.shape[1]):
        y, V, s, _ = stack.step(x[:, t], V, s, None if mask is None else mask[:, t])
        ys.append(y)
    return torch.stack(ys, 1), V, s
