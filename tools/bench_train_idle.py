"""``bench train --idle``: where the GPU idles during profiled training steps, by host phase.

The profiled steps record CUDA activity only (the host's own ops are not traced, so it runs
nearly as fast as unprofiled), and :class:`PhaseMarks` launches a tiny marker kernel
(``torch.cuda._sleep(1)``) at the start and end of every model call, end-of-example call,
optimizer step, batch set-up (``ModeSupport.target``) and decoder forward (labelled with the
batch's mode: ``decoder:image``). The GPU runs kernels in
launch order, so the n-th marker kernel in the trace is the n-th host mark; every interval in
which no kernel runs is charged to the host phase of the last marker before it
(:func:`idle_by_phase`). A gap right after ``target:start`` is the GPU waiting for a batch's
set-up; one after ``end:run`` or ``end:opt`` for the dispatcher and the loader (the data work
between calls); one in ``opt`` for the host launching the backward.

First used in device calls P13-P18 (model/GPU_NOTES.md): it found the H200 idle ~90 ms before
each image or audio batch, waiting for the set-up.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

MARKER = "spin_kernel"  # the name of torch.cuda._sleep's kernel
# phases of the host's data work: the batch set-up and the intervals between calls
DATA_PHASES = ("target:start", "target:end", "end:run", "end:fin", "end:opt")


def idle_by_phase(kernels: Sequence[tuple[int, int, str]], labels: Sequence[str]) -> dict:
    """Kernels [(start ns, duration ns, name)] of the profiled span and the host's marks in
    launch order -> span, busy share and the GPU's idle ms per phase (a label's part before its
    second ``:``; ``run:text:1024:(61,)`` is ``run:text``), the data work's share, and the
    largest gaps. The marks must match the trace's marker kernels one to one."""
    ks = sorted(kernels)
    marks = [i for i, k in enumerate(ks) if MARKER in k[2]]
    if len(marks) != len(labels):
        raise ValueError(f"{len(marks)} marker kernels in the trace for {len(labels)} host marks")
    if not ks:
        return {"span_ms": 0.0, "busy_share": None, "idle_ms": {}}
    label_at = dict(zip(marks, labels))
    phase, end, busy, start = "before", ks[0][0], 0, ks[0][0]
    idle: dict[str, float] = defaultdict(float)
    gaps = []
    for i, (s, d, name) in enumerate(ks):
        if s > end:  # nothing ran from end to s
            busy += end - start
            key = ":".join(phase.split(":")[:2])
            idle[key] += (s - end) / 1e6
            gaps.append(((s - end) / 1e6, phase, name))
            start = s
        end = max(end, s + d)
        phase = label_at.get(i, phase)
    busy += end - start
    span = (end - ks[0][0]) / 1e6
    data = sum(v for k, v in idle.items() if k in DATA_PHASES)
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": round(span, 1), "busy_share": round(busy / 1e6 / span, 3) if span else None,
            "idle_ms": {k: round(v, 1) for k, v in sorted(idle.items(), key=lambda x: -x[1])},
            "share_idle_data": round(data / span, 3) if span else None,
            "largest_gaps": [[round(ms, 1), ph[:60], nxt[:60]] for ms, ph, nxt in gaps[:8]]}


def cuda_kernels(prof) -> list[tuple[int, int, str]]:
    """(start ns, duration ns, name) of every CUDA activity (kernels and copies) of a
    torch.profiler run."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if "CUDA" in str(e.device_type()) and e.duration_ns() > 0:
            out.append((e.start_ns(), e.duration_ns(), e.name()))
    return out


class PhaseMarks:
    """Marker kernels around the trainer's phases while :attr:`on` (see the module docstring).
    Wraps the trainer's runner calls and optimizer step and, per instance, each mode support's
    ``target`` and the decoder's ``forward``; :meth:`close` restores them."""

    def __init__(self, trainer) -> None:
        import torch

        self.on, self.labels, self.mode = False, [], ""
        self._undo: list[tuple[object, str, object]] = []
        self._sleep = torch.cuda._sleep
        r = trainer.runners
        self._wrap(r, "run", self._run_label, "end:run")
        self._wrap(r, "finish", lambda *a: "fin", "end:fin")
        self._wrap(trainer, "optimizer_step", lambda *a: "opt", "end:opt")
        for sup in trainer.model.supports.values():
            self._wrap(sup, "target", lambda *a: "target:start", "target:end")
        # the decoder's forward by the mode of the batch it runs (``decoder:text``): which
        # modes' layers leave the GPU waiting for the host
        self._wrap(trainer.model.decoder, "forward", lambda *a: f"decoder:{self.mode}",
                   "decoder:end")

    def _run_label(self, mode: str, batch) -> str:
        self.mode = mode
        return f"run:{mode}:{len(batch.requests)}"

    def _wrap(self, obj, name: str, start, end: str) -> None:
        orig = getattr(obj, name)
        own = name in vars(obj)  # an instance attribute already (another wrapper): put it back

        def marked(*a, **k):
            self._mark(start(*a))
            try:
                return orig(*a, **k)
            finally:
                self._mark(end)
        setattr(obj, name, marked)
        self._undo.append((obj, name, orig if own else None))

    def _mark(self, label: str) -> None:
        if self.on:
            self._sleep(1)
            self.labels.append(label)

    def close(self) -> None:
        """Take the wrappers off again (last first)."""
        for obj, name, orig in reversed(self._undo):
            if orig is None:
                delattr(obj, name)
            else:
                setattr(obj, name, orig)
        self._undo.clear()
