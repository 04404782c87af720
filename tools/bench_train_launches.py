"""Kernel launches of a profiled training step, by the code that made them.

Eager PyTorch pays host time per launch (~7-12 us of ``cudaLaunchKernel`` on the H200's host,
plus the op's dispatch), and a mixed ``small`` step makes thousands, so the launch count is a
cost of its own beside kernel time. This charges every runtime launch (kernel launches, graph
launches, memsets, memcpys) of a ``torch.profiler`` run to where it came from: in the backward,
the autograd node that ran it (``AddmmBackward0``, ``KernelGatesTritonBackward``, ...; its
forward made the node); in the forward, the outermost aten op around it. Without CUDA (tests,
CPU runs) the leaf aten ops are counted instead. ``bench train --profile-steps N --trace DIR``
writes the table to ``DIR/<tag>.launches.txt`` (GPU_NOTES.md, calls P94 and P96: 10,682 ->
8,776 launches in the same 2 mixed steps).
"""

from __future__ import annotations

from collections import Counter

RUNTIME_LAUNCHES = ("cudaLaunchKernel", "cuLaunchKernel", "cuLaunchKernelEx",
                    "cudaLaunchKernelExC", "cudaGraphLaunch", "cudaMemsetAsync",
                    "cudaMemcpyAsync")
_NODE = "autograd::engine::evaluate_function: "


def _source(ev) -> tuple[str, str]:
    """(phase, source) of a launch event: the backward node above it, else the outermost aten
    op (the forward's)."""
    top = None
    p = ev.cpu_parent
    while p is not None:
        if p.name.startswith(_NODE):
            return "backward", p.name[len(_NODE):]
        if p.name.startswith("aten::"):
            top = p.name
        p = p.cpu_parent
    return "forward", top or ev.name


def count_launches(events) -> tuple[int, Counter, bool]:
    """Launches in ``events`` (a profiler's ``events()``): the total, a Counter of (phase,
    source), and whether they are CUDA runtime launches (False: leaf aten ops, no CUDA)."""
    events = list(events)
    cuda = any(e.name in RUNTIME_LAUNCHES for e in events)
    by: Counter = Counter()
    for e in events:
        if cuda:
            if e.name not in RUNTIME_LAUNCHES:
                continue
        elif not e.name.startswith("aten::") or e.cpu_children:
            continue
        by[_source(e)] += 1
    return sum(by.values()), by, cuda


def launch_table(tag: str, total: int, by: Counter, cuda: bool, rows: int = 60) -> str:
    """The counts as text, largest first."""
    what = "runtime launches" if cuda else "leaf aten ops (no CUDA)"
    lines = [f"== {tag}: {what}: {total} ==", f"{'count':>7}  phase     source"]
    lines += [f"{n:>7}  {ph:<8}  {src}" for (ph, src), n in by.most_common(rows)]
    return "\n".join(lines) + "\n"
