"""Data-parallel training without DDP's bucket hooks: explicit, deterministic collectives.

Ranks run different modes at the same dispatcher step (the dispatcher keeps their step counts
equal, padding with empty batches), so some parameters get no gradient on some ranks. Instead of
``DistributedDataParallel`` (whose reducer expects the same parameters used on every rank), each
rank back-propagates its share of the window's objective, normalised by the *global* element
counts, and the gradients are summed across ranks once per optimizer step. The result is the
gradient of the whole global window, as one process would compute it.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


class Collective:
    """Sums across ranks; a no-op in a single process."""

    def __init__(self) -> None:
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a short list of numbers (float64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def sum_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Sum every parameter's gradient over ranks (missing gradients count as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(p).clone()
            at += n


def init_from_launcher() -> bool:
    """Join the process group when started by ``torchrun``; returns whether it did."""
    if not dist.is_available() or not dist.is_torchelastic_launched():
        return False
    if torch.cuda.is_available():
        # one GPU per process: torchrun names this process's GPU in LOCAL_RANK (the launcher's
        # protocol, not configuration); without it every rank would take cuda:0 and NCCL fails
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        # the step's bookkeeping collectives use CPU tensors, the gradients CUDA ones: NCCL alone
        # has no CPU backend ("No backend type associated with device type cpu")
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_world_size() > 1


def leave_launcher_group(wait: bool = True) -> None:
    """Destroy the process group :func:`init_from_launcher` joined (under ``torchrun``), once
    the run is over. Left to the interpreter's exit, the group's C++ threads could be torn down
    still running: a rank then aborted after its last step ("terminate called without an active
    exception", SIGABRT, and torchrun reported the run failed; seen once in CI on
    ``test_two_process_gloo_matches_one_process``). ``wait``: first a barrier, so that no
    rank tears the group down while another still talks to it (not after a failure: the other
    ranks may be gone, and the barrier would wait for its timeout)."""
    if dist.is_available() and dist.is_torchelastic_launched() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
