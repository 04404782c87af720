"""What machine a benchmark ran on, measured in the benchmark's own process.

The lent H200 machines differ: the same commit and data ran mixed training 8% slower on some of
them (GPU_NOTES P155, P156), and the step there is partly the host's (the model thread launches
kernels while the read-ahead thread decodes, both in one Python process). A figure without its
machine cannot be compared with one from another call. :func:`machine_fingerprint` measures, in
a few seconds, the parts a step's speed depends on:

- ``python_loop_ns``: one iteration of a plain Python loop (the host thread's own speed: the
  dispatcher, the read-ahead's Python, the autograd engine's Python functions);
- ``op_launch_us``: the host's time to issue one small in-place tensor op on the device
  (dispatch and, on CUDA, the kernel launch; the queue never fills, so the GPU's speed is not
  in it);
- on CUDA, ``matmul_tflops``: a bf16 8192^3 matrix product's rate (the GPU's clocks and power),
  and what ``nvidia-smi`` says of the clocks and power limit, where it is installed.

``bench train`` puts it in every result as ``machine`` (measured before its runs) and
``machine_after`` (after them: on a freshly started H200 machine the first measurement read
the host at half its later speed, GPU_NOTES P158); ``bench train-compare`` prints both runs'.
``python -m blocklm.tools.bench_machine`` prints it as JSON.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time

SMI_FIELDS = ("clocks.sm", "clocks.max.sm", "clocks.mem", "power.limit", "temperature.gpu")


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor string elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _loop_times(iterations: int, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        x = 0
        for i in range(iterations):
            x += i
        times.append(time.perf_counter() - t)
    return times


def python_loop_ns(iterations: int = 200_000, rounds: int = 5) -> float:
    """Nanoseconds per iteration of a plain Python loop with an add (the median of ``rounds``)."""
    return round(statistics.median(_loop_times(iterations, rounds)) / iterations * 1e9, 2)


def op_launch_us(device: str, ops: int = 500, rounds: int = 7) -> float:
    """Host microseconds to issue one ``add_`` on a 1-element tensor on ``device`` (the median
    of ``rounds``). On CUDA the device is synchronised between rounds only, and ``ops`` stays
    under the launch queue's depth (~1,024), so the host never waits for the GPU inside a
    round."""
    import torch

    dev = torch.device(device)
    x = torch.zeros(1, device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    for _ in range(50):  # first calls: the dispatcher's caches, the CUDA context
        x.add_(1.0)
    sync()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(ops):
            x.add_(1.0)
        times.append(time.perf_counter() - t)
        sync()
    return round(statistics.median(times) / ops * 1e6, 3)


def matmul_tflops(device: str, n: int = 8192, reps: int = 10) -> float | None:
    """A bf16 n x n x n matrix product's TFLOP/s on a CUDA ``device`` (CUDA events, after two
    products unmeasured); None elsewhere."""
    import torch

    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        a @ b
    end.record()
    end.synchronize()
    s = start.elapsed_time(end) / 1e3 / reps
    return round(2 * n**3 / s / 1e12, 1)


def smi_query(index: int = 0) -> dict[str, str] | None:
    """``nvidia-smi``'s clocks, power limit and temperature of GPU ``index``, as it prints them;
    None where it is not installed or does not answer within 10 s."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, f"--id={index}", "--query-gpu=" + ",".join(SMI_FIELDS),
                              "--format=csv,noheader"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    vals = [v.strip() for v in out.splitlines()[0].split(",")] if out else []
    return dict(zip(SMI_FIELDS, vals)) if len(vals) == len(SMI_FIELDS) else None


def _spread(samples: list[float]) -> list[float]:
    return [round(min(samples), 3), round(max(samples), 3)]


def _busy(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        _loop_times(10_000, 1)


def machine_fingerprint(device: str, samples: int = 5, spin_s: float = 0.5) -> dict:
    """The machine ``device`` lives on: CPU model and count, the host's Python and op-launch
    speed, and on CUDA the GPU's name, matmul rate and clocks (keys with None elsewhere).

    The host's figures are the medians of ``samples`` measurements ~0.05 s apart, with their
    range (``*_spread``: [min, max]): on the lent H200 hosts one measurement moved by up to 2x
    within a minute on the same machine (GPU_NOTES P159), so a single one says little. They are
    taken after ``spin_s`` of busy host work: on an idle H200 host the loop read 40-68 ns
    against 30-32 ns inside a run's process (P157-P160), the cores' clocks still low."""
    import torch

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    index = (dev.index if dev.index is not None else torch.cuda.current_device()) if cuda else 0
    _busy(spin_s)  # an idle host's cores run slowly until a load raises their clocks
    loops, ops = [], []
    for _ in range(samples):
        loops.append(python_loop_ns(rounds=3))
        ops.append(op_launch_us(device, rounds=3))
        time.sleep(0.05)
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "python_loop_ns": round(statistics.median(loops), 2),
        "python_loop_ns_spread": _spread(loops),
        "op_launch_us": round(statistics.median(ops), 3),
        "op_launch_us_spread": _spread(ops),
        "gpu": torch.cuda.get_device_name(index) if cuda else None,
        "matmul_tflops": matmul_tflops(device),
        "smi": smi_query(index) if cuda else None,
    }


def fingerprint_or_error(spin_s: float) -> dict:
    """:func:`machine_fingerprint` of the device a trainer takes (CUDA when there is one), or
    ``{"error": ...}`` when measuring fails: a benchmark's figures never wait on it."""
    import torch

    try:
        return machine_fingerprint("cuda" if torch.cuda.is_available() else "cpu",
                                   spin_s=spin_s)
    except Exception as e:  # noqa: BLE001 - beside the figures, never instead of them
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def describe(m: dict | None) -> str:
    """One line for a table: the host's loop and launch times, the GPU's matmul rate."""
    if not m:
        return "machine not recorded"
    if "error" in m:
        return f"machine not measured ({m['error']})"
    def fig(key: str, unit: str) -> str:
        lo_hi = m.get(key + "_spread")
        return f"{m.get(key)} {unit}" + (f" ({lo_hi[0]}-{lo_hi[1]})" if lo_hi else "")
    parts = [f"loop {fig('python_loop_ns', 'ns')}", f"op {fig('op_launch_us', 'us')}"]
    if m.get("matmul_tflops") is not None:
        parts.append(f"matmul {m['matmul_tflops']} TFLOP/s")
    smi = m.get("smi") or {}
    if smi.get("clocks.sm"):
        parts.append(f"SM {smi['clocks.sm']}")
    return ", ".join(parts) + f" ({m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs)"


if __name__ == "__main__":
    import json

    import torch

    print(json.dumps(machine_fingerprint("cuda" if torch.cuda.is_available() else "cpu")))
