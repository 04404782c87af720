"""Host time of the banked call's parts (launches, allocations) at 1K and 4K (CUDA only).

Each launch and each ``torch.empty``-like allocation is wrapped in ``perf_counter`` in this
process only (so every figure is ~10% high); per length it prints the host's time per call and
each part's share, twice per length. model/GPU_NOTES.md, call L6.
Usage: ``python -m blocklm.tools.bench_gpu_host``.
"""

from __future__ import annotations

import collections
import time

ALLOCS = ("empty", "empty_like", "zeros", "zeros_like")


def instrument(rec: dict[str, list[float]]) -> None:
    """Record the host seconds of every kernel launch and allocation into ``rec``."""
    import torch

    from blocklm.model import banked_launch as bl

    launch = bl.Launcher.__call__

    def timed_launch(self, kern, grid, *a, **k):
        t = time.perf_counter()
        launch(self, kern, grid, *a, **k)
        rec["launch " + getattr(kern, "__name__", str(kern))[:20]].append(
            time.perf_counter() - t)

    bl.Launcher.__call__ = timed_launch
    def timed(fn, name: str):
        def call(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            rec[name].append(time.perf_counter() - t)
            return r
        return call

    for name in ALLOCS:
        setattr(torch, name, timed(getattr(torch, name), name))


def main(lengths=(1024, 4096, 1024, 4096), calls: int = 20) -> None:
    import torch

    from blocklm.model import banked_triton as bt
    from blocklm.tools.bench_gpu import _fwd_bwd, _inputs
    from blocklm.tools.bench_gpu_gaps import host_us

    rec: dict[str, list[float]] = collections.defaultdict(list)
    instrument(rec)
    for T in lengths:
        xs = _inputs(4, 16, T, 128, 4, seed=T)
        dout = torch.randn_like(xs[2])
        run = _fwd_bwd(lambda *a: bt.banked_attention(*a, eps=1e-3, chunk=64)[0], xs, dout)
        for _ in range(5):
            run()
        rec.clear()
        per_call = host_us(run, calls)
        parts = sorted(rec.items(), key=lambda kv: -sum(kv[1]))
        print(f"T={T} host per call {per_call:.0f} us; parts (us per call, "
              "count): " + ", ".join(f"{k} {sum(v) / calls * 1e6:.0f} ({len(v) // calls})"
                                     for k, v in parts), flush=True)
        print("  max single: " + ", ".join(f"{k} {max(v) * 1e6:.0f}" for k, v in parts),
              flush=True)


if __name__ == "__main__":
    main()
