"""Host time of the banked call's path to its kernels, on the CPU (no GPU needed).

Each module's ``banked_launch.Launcher`` is replaced by a stub that does the cached fast path's own
Python (key tuple, one hash, ``data_ptr`` of every tensor) and records when each kernel would be
launched; the inputs are small CPU bf16/fp32 tensors that require gradients, so autograd's
bookkeeping is real. Printed per module, alternating rounds: the median microseconds from the
call's start to the launch of ``decay_prep`` and of ``fwd_h`` (the GPU idles until then: the
per-call time of ``bench gpu`` includes it), to the forward's return, and the whole call.
The H200 host is slower (allocations and launches cost more there), so only same-run
differences on one machine mean anything. model/GPU_NOTES.md, "kern, 2026-11-23 22:15".
Usage: ``python -m blocklm.tools.bench_gpu_host_cpu MODULE[,MODULE...] [ROUNDS [CALLS]]``
(modules with a ``banked_attention_triton`` beside a ``banked_launch``, e.g.
``blocklm.model.banked_triton`` and a copy of earlier code on ``PYTHONPATH``).
"""

from __future__ import annotations

import importlib
import statistics
import sys
import time


def stub_launches(modname: str, marks: dict, t0: list) -> object:
    """Import ``modname`` with its launcher stubbed (records ``kernel name -> seconds``)."""
    import torch

    bt = importlib.import_module(modname)
    bl = importlib.import_module(modname.rsplit(".", 1)[0] + ".banked_launch")

    def init(self, device, key, fast):
        self.fast, self.key, self.stream = True, (0, key), 1

    def call(self, kern, grid, *args, num_warps=4, num_stages=None, maxnreg=None, **consts):
        hash((id(kern), self.key, num_warps, num_stages, maxnreg, *consts.values()))
        [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
        marks.setdefault(getattr(kern, "__name__", "?"), time.perf_counter() - t0[0])

    bl.Launcher.__init__, bl.Launcher.__call__ = init, call
    return bt


def main(argv: list[str]) -> None:
    import torch

    mods = argv[0].split(",")
    rounds = int(argv[1]) if len(argv) > 1 else 3
    calls = int(argv[2]) if len(argv) > 2 else 300
    marks: dict = {}
    t0 = [0.0]
    bts = {m: stub_launches(m, marks, t0) for m in mods}
    B, H, T, D, N = 4, 16, 256, 128, 4
    gen = torch.Generator().manual_seed(0)
    xs = tuple(x.requires_grad_() for x in (
        (torch.rand(B, H, T, D, generator=gen) + 0.1).bfloat16(),
        (torch.rand(B, H, T, D, generator=gen) + 0.1).bfloat16(),
        torch.randn(B, H, T, D, generator=gen).bfloat16(),
        torch.rand(B, H, T, N, generator=gen).softmax(-1),
        torch.rand(B, H, T, N, generator=gen).softmax(-1), torch.rand(B, H, T, generator=gen)))
    dout = torch.randn(B, H, T, D, generator=gen).bfloat16()

    def one(bt) -> tuple[float, ...]:
        marks.clear()
        t0[0] = time.perf_counter()
        o = bt.banked_attention_triton(*xs, eps=1e-3, chunk=64)[0]
        ret = time.perf_counter() - t0[0]
        torch.autograd.grad(o, xs, dout)
        return marks["decay_prep"], marks["fwd_h"], ret, time.perf_counter() - t0[0]

    for m in mods:  # warm-up
        for _ in range(calls // 2 + 1):
            one(bts[m])
    for rnd in range(rounds):
        for m in mods:
            res = [one(bts[m]) for _ in range(calls)]
            med = [statistics.median(x[i] for x in res) * 1e6 for i in range(4)]
            print(f"round {rnd} {m:34s} decay_prep {med[0]:6.1f} us  fwd_h {med[1]:6.1f}  "
                  f"forward returns {med[2]:6.1f}  call {med[3]:6.1f}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
