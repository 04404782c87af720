"""Host time of one cached banked-kernel launch: Triton's launcher object against the direct C
call that :func:`blocklm.model.banked_launch.raw_launch` finds (CUDA only).

A probe kernel with 3 or 12 pointer arguments (the banked kernels take 3-17) is launched through
:class:`blocklm.model.banked_launch.Launcher` ``--launches`` times per sample, the host's
``perf_counter`` around each launch, a sync between batches of 100 so the launch queue never
fills; both paths alternate within each round, so the machine's drift falls on both alike.
Usage: ``python -m blocklm.tools.bench_gpu_launch [--rounds 5]``. model/GPU_NOTES.md, call M4.
"""

from __future__ import annotations

import json
import statistics
import time

import click


def _probe_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def probe3(a, b, c, n, K: tl.constexpr):
        if tl.program_id(0) == 0:
            tl.store(a, n + K)

    @triton.jit
    def probe12(a, b, c, d, e, f, g, h, i, j, k, m, n, K: tl.constexpr):
        if tl.program_id(0) == 0:
            tl.store(a, n + K)
    return probe3, probe12


def _per_launch_us(launch, n: int) -> float:
    import torch

    ts = []
    for start in range(0, n, 100):
        for _ in range(min(100, n - start)):
            t = time.perf_counter()
            launch()
            ts.append(time.perf_counter() - t)
        torch.cuda.synchronize()
    return statistics.median(ts) * 1e6


@click.command()
@click.option("--rounds", default=5, show_default=True)
@click.option("--launches", default=2000, show_default=True)
def main(rounds: int, launches: int) -> None:
    """Median host microseconds per launch, wrapper vs direct, per pointer count."""
    import torch

    from blocklm.model import banked_launch as bl

    probe3, probe12 = _probe_kernels()
    xs = [torch.zeros(64, device="cuda", dtype=torch.int32) for _ in range(12)]
    real = bl.raw_launch

    def timed(kern, ptrs, direct: bool) -> float:
        bl.raw_launch = real if direct else (lambda run: None)
        bl._CACHE.clear()  # the next launch compiles (cached) and stores an entry of this kind
        L = bl.Launcher(xs[0].device, ("probe",), True)
        try:
            L(kern, (1,), *ptrs, 7, K=1)
        finally:
            bl.raw_launch = real
        torch.cuda.synchronize()
        return _per_launch_us(lambda: L(kern, (1,), *ptrs, 7, K=1), launches)

    for r in range(rounds):
        row = {"round": r}
        for name, kern, ptrs in (("3 pointers", probe3, xs[:3]), ("12 pointers", probe12, xs)):
            row[name] = {"wrapper_us": round(timed(kern, ptrs, False), 2),
                         "direct_us": round(timed(kern, ptrs, True), 2)}
        click.echo(json.dumps(row))


if __name__ == "__main__":
    main()
