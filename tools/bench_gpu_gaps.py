"""Where the banked call's per-call time goes beyond its kernels (CUDA only).

``bench gpu`` times a call two ways: waiting for each call (per call) and queued back to back.
This prints, per length T, both medians, the host's time for the forward and for the backward
(no profiler), then one profiled call as a timeline: each kernel's start on the GPU relative to
the call's start and the gap before it, and the longest host ops. model/GPU_NOTES.md, call L5.
Usage: ``python -m blocklm.tools.bench_gpu_gaps [T ...] [--vs MODULE[,MODULE]]`` (default
4096); with ``--vs`` (importable modules with another ``banked_attention``, e.g.
``blk9.banked_triton``, copies of earlier code) the figures without the profiler are taken for
each and for HEAD, alternating, twice.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time

B, H, D, N = 4, 16, 128, 4  # bench gpu's shape


def host_us(fn, n: int = 30) -> float:
    """Median host microseconds of ``fn()`` started on an idle GPU."""
    import torch

    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return round(statistics.median(ts) * 1e6, 1)


def measure(T: int, vs: str | None = None) -> None:
    """Print the figures of one length (see the module docstring)."""
    import importlib

    import torch

    from blocklm.model import banked_triton as bt
    from blocklm.tools.bench_gpu import _inputs

    xs = _inputs(B, H, T, D, N, seed=T)
    dout = torch.randn_like(xs[2])
    mods = [("HEAD", bt)] if vs is None else [
        (m, importlib.import_module(m)) for m in vs.split(",")] + [("HEAD", bt)]
    mods = mods if vs is None else mods * 2
    for name, mod in mods:
        figures(T, mod, xs, dout, "" if vs is None else name)
    timeline(T, bt, xs, dout)


def figures(T: int, mod, xs, dout, name: str = "") -> None:
    """Per call and queued medians, host times of the call's parts (no profiler): one line."""
    import torch

    from blocklm.tools.bench_gpu import _fwd_bwd, _median_ms, _queued_ms

    def banked(*a):
        return mod.banked_attention(*a, eps=1e-3, chunk=64)[0]

    def backward_us() -> float:
        y = banked(*xs)
        torch.cuda.synchronize()
        t = time.perf_counter()
        torch.autograd.grad(y, xs, dout)
        return time.perf_counter() - t

    run = _fwd_bwd(banked, xs, dout)
    for _ in range(5):
        run()
    out = {"T": T, **({"code": name} if name else {}),
           "per_call_ms": round(_median_ms(run, 50), 4),
           "queued_ms": round(_queued_ms(run, 50), 4), "host_us_fwd_bwd": host_us(run),
           "host_us_fwd_grad": host_us(lambda: banked(*xs))}
    with torch.no_grad():
        out["host_us_fwd_nograd"] = host_us(lambda: banked(*xs))
    out["host_us_bwd"] = round(statistics.median(backward_us() for _ in range(30)) * 1e6, 1)
    print(json.dumps(out), flush=True)


def timeline(T: int, bt, xs, dout) -> None:
    """One profiled call: each kernel's start relative to the call's and the longest host ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from blocklm.tools.bench_gpu import _fwd_bwd

    run = _fwd_bwd(lambda *a: bt.banked_attention(*a, eps=1e-3, chunk=64)[0], xs, dout)
    run()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(3):
            torch.cuda.synchronize()
            with record_function(f"call{i}"):
                run()
            torch.cuda.synchronize()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        ev = [e for e in json.load(open(f.name))["traceEvents"] if e.get("ph") == "X"]
    call = next(e for e in ev if e["name"] == "call2")  # the last call: warm caches
    t0, t1 = call["ts"], call["ts"] + call["dur"]
    ker = sorted((e for e in ev if e.get("cat") == "kernel" and t0 <= e["ts"] <= t1 + 20000),
                 key=lambda e: e["ts"])
    print(f"T={T} profiled call: host {call['dur']:.0f} us, {len(ker)} kernels, GPU done at "
          f"{ker[-1]['ts'] + ker[-1]['dur'] - t0:.0f} us", flush=True)
    prev_end = t0
    for k in ker:
        print(f"  {k['name'][:28]:28} start {k['ts'] - t0:8.1f}  dur {k['dur']:7.1f}  "
              f"gap {k['ts'] - prev_end:6.1f}")
        prev_end = k["ts"] + k["dur"]
    top = sorted((e for e in ev if e.get("cat") == "cpu_op" and t0 <= e["ts"] <= t1),
                 key=lambda e: -e["dur"])[:12]
    for e in top:
        print(f"  cpu {e['name'][:40]:40} at {e['ts'] - t0:8.1f} dur {e['dur']:7.1f}")


def main(argv: list[str]) -> None:
    vs = argv[argv.index("--vs") + 1] if "--vs" in argv else None
    for T in [int(a) for a in argv if a.isdigit()] or [4096]:
        measure(T, vs)


if __name__ == "__main__":
    main(sys.argv[1:])
