"""``bench train --alloc-trace``: where the CUDA caching allocator asks the device for memory.

At the defaults a mixed `small` step makes ~3-5 ``cudaMalloc`` and as many ``cudaFree`` calls
(``allocator_per_step``, GPU_NOTES P148-P151), and each ``cudaFree`` waits for the device. The
counters say how many, not which work needs them. Over the profiled steps the bench records the
allocator's history (:func:`torch.cuda.memory._record_memory_history`) and
:func:`segment_events` reads its snapshot: the segments allocated and freed per step, by size,
the named ranges they fell in (``record_function``: ``bench:run:image > blocklm:head_bits``, ...)
and the out-of-memory retries.

The history records no stack traces. With Python frames (``context="all"``), PyTorch 2.11
corrupts the heap of a training run: a compiled function under activation checkpointing (the
element heads' loss slices) fails with "apply of FunctionMeta returned NULL without setting an
exception", then glibc aborts the process (GPU_NOTES P136 and P152; pytorch/pytorch#179536).
The allocator's named-range annotations are recorded without frames, and the bench and the
model already mark their phases with ``record_function``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter, defaultdict
from typing import Any

GIB = 2**30
# segment sizes: the state tensors of large batches are 4-7 GiB (4.6 MiB an example), and
# blocks of 6 GiB and more are never split at the defaults (train.cuda_alloc)
SIZE_BUCKETS = ((GIB // 16, "<64MiB"), (GIB, "64MiB-1GiB"), (6 * GIB, "1-6GiB"),
                (None, ">=6GiB"))
MAX_ENTRIES = 1_000_000  # trace entries kept (the allocator drops the oldest past it)


def start_recording() -> None:
    """Record the allocator's history from now on, with the named ranges this thread enters and
    leaves but no stack traces (see the module's docstring); CUDA only."""
    import torch

    torch.cuda.memory._record_memory_history(enabled="all", context=None,
                                             max_entries=MAX_ENTRIES)


def stop_recording(steps: int) -> dict[str, Any]:
    """The recording's :func:`segment_events` over ``steps`` optimizer steps; recording off."""
    import torch

    try:
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    return segment_events(snap, steps, device=torch.cuda.current_device())


def size_bucket(size: int) -> str:
    """The :data:`SIZE_BUCKETS` label of a segment of ``size`` bytes."""
    return next(label for top, label in SIZE_BUCKETS if top is None or size < top)


class OpenRanges:
    """The named ranges open at any time of a recording, from a snapshot's
    ``external_annotations`` (the START and END marks of ``record_function`` ranges) for one
    device. An END closes the innermost open range of its name."""

    def __init__(self, annotations: list[dict[str, Any]], device: int = 0) -> None:
        marks = sorted((a for a in annotations if a.get("device", device) == device),
                       key=lambda a: a.get("time_us", 0))
        stack: list[str] = []
        self.times: list[float] = []
        self.stacks: list[tuple[str, ...]] = []
        for a in marks:
            name = str(a.get("name", "?"))
            if a.get("stage") == "START":
                stack.append(name)
            elif name in stack:
                del stack[len(stack) - 1 - stack[::-1].index(name)]
            self.times.append(a.get("time_us", 0))
            self.stacks.append(tuple(stack))

    def at(self, t: float) -> str:
        """The ranges open at time ``t`` as ``outer > inner``, or "(no range)"."""
        i = bisect_right(self.times, t) - 1
        names = self.stacks[i] if i >= 0 else ()
        return " > ".join(names) if names else "(no range)"


def segment_events(snapshot: dict[str, Any], steps: int, device: int = 0,
                   top: int = 8) -> dict[str, Any]:
    """Segments the allocator took from (``segment_alloc``: ``cudaMalloc``) and gave back to
    (``segment_free``: ``cudaFree``) the device in ``snapshot``'s trace of ``device``, over
    ``steps`` optimizer steps: counts and GiB per step, counts by size, the ``top`` sites by
    count, and ``oom`` events (a request the device could not serve even after the cache was
    freed). A segment's site is the named ranges open when the request that needed it (or
    whose retry freed it) was made (:class:`OpenRanges`)."""
    traces = snapshot.get("device_traces") or []
    events = traces[device] if device < len(traces) else []
    ranges = OpenRanges(snapshot.get("external_annotations") or [], device)
    per = max(steps, 1)
    out: dict[str, Any] = {"steps": steps, "trace_entries": len(events),
                           "trace_full": len(events) >= MAX_ENTRIES}
    for action, key in (("segment_alloc", "mallocs"), ("segment_free", "frees")):
        ev = [e for e in events if e.get("action") == action]
        by_size: Counter[str] = Counter(size_bucket(int(e.get("size", 0))) for e in ev)
        sites: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        for e in ev:
            s = sites[ranges.at(e.get("time_us", 0))]
            s[0] += 1
            s[1] += int(e.get("size", 0)) / GIB
        out[key] = {
            "per_step": round(len(ev) / per, 2),
            "gib_per_step": round(sum(int(e.get("size", 0)) for e in ev) / GIB / per, 2),
            "by_size": {label: by_size[label] for _, label in SIZE_BUCKETS if by_size[label]},
            "sites": [{"site": k, "n": int(v[0]), "gib": round(v[1], 2)} for k, v in
                      sorted(sites.items(), key=lambda kv: (-kv[1][0], -kv[1][1]))[:top]]}
    out["ooms"] = sum(1 for e in events if e.get("action") == "oom")
    return out
