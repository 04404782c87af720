"""bench_machine: the fingerprint of the machine a benchmark ran on."""

from __future__ import annotations

import subprocess

import pytest
import torch

from blocklm.tools import bench_machine as bm


def test_the_fingerprint_on_the_cpu_measures_the_host_and_names_no_gpu():
    m = bm.machine_fingerprint("cpu")
    assert m["cpu"] and m["cpus"] >= 1
    assert 0 < m["python_loop_ns"] < 10_000  # ns per iteration: a plain add, not a sleep
    assert 0 < m["op_launch_us"] < 10_000
    for key in ("python_loop_ns", "op_launch_us"):  # the median lies in the samples' range
        lo, hi = m[key + "_spread"]
        assert lo <= m[key] <= hi
    assert (m["gpu"], m["matmul_tflops"], m["smi"]) == (None, None, None)


def test_the_loop_time_is_per_iteration():
    # ten times the iterations take about ten times as long: the figure is per iteration
    a = bm.python_loop_ns(iterations=20_000, rounds=3)
    b = bm.python_loop_ns(iterations=200_000, rounds=3)
    assert 0.2 < a / b < 5


def test_smi_is_read_field_by_field_and_none_when_it_does_not_answer(monkeypatch):
    monkeypatch.setattr(bm.shutil, "which", lambda exe: "/usr/bin/nvidia-smi")

    class Done:
        stdout = "1980 MHz, 1980 MHz, 3201 MHz, 700.00 W, 34\n"

    monkeypatch.setattr(bm.subprocess, "run", lambda *a, **k: Done())
    assert bm.smi_query() == {"clocks.sm": "1980 MHz", "clocks.max.sm": "1980 MHz",
                              "clocks.mem": "3201 MHz", "power.limit": "700.00 W",
                              "temperature.gpu": "34"}

    def hangs(*a, **k):
        raise subprocess.TimeoutExpired("nvidia-smi", 10)

    monkeypatch.setattr(bm.subprocess, "run", hangs)
    assert bm.smi_query() is None
    monkeypatch.setattr(bm.shutil, "which", lambda exe: None)
    assert bm.smi_query() is None


def test_describe_gives_one_line_with_the_gpu_where_there_is_one():
    m = {"cpu": "Xeon", "cpus": 16, "python_loop_ns": 30.5, "op_launch_us": 4.2,
         "matmul_tflops": 701.3, "smi": {"clocks.sm": "1980 MHz"}}
    assert bm.describe(m) == ("loop 30.5 ns, op 4.2 us, matmul 701.3 TFLOP/s, SM 1980 MHz "
                              "(Xeon, 16 CPUs)")
    assert bm.describe(None) == "machine not recorded"
    m["python_loop_ns_spread"] = [29.0, 61.2]
    assert bm.describe(m).startswith("loop 30.5 ns (29.0-61.2), op 4.2 us, ")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_fingerprint_on_cuda_measures_the_gpu():
    m = bm.machine_fingerprint("cuda")
    assert m["gpu"] and m["matmul_tflops"] > 1
    assert m["op_launch_us"] > 0


def test_a_failed_measurement_is_an_error_the_table_names(monkeypatch):
    def fails(device, spin_s):
        raise RuntimeError("CUDA error: device busy")

    monkeypatch.setattr(bm, "machine_fingerprint", fails)
    m = bm.fingerprint_or_error(spin_s=0.0)
    assert m == {"error": "RuntimeError: CUDA error: device busy"}
    assert bm.describe(m) == "machine not measured (RuntimeError: CUDA error: device busy)"
