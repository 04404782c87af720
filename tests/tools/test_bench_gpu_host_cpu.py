"""The CPU stand-in of the banked call's host path (tools/bench_gpu_host_cpu.py) runs the real
forward and backward with stubbed launches and reports when each launch would happen."""

from __future__ import annotations

import re

import pytest

from blocklm.tools import bench_gpu_host_cpu


def test_reports_the_launch_times_in_call_order(capsys):
    pytest.importorskip("triton")
    bench_gpu_host_cpu.main(["blocklm.model.banked_triton", "1", "4"])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    nums = [float(x) for x in re.findall(r"(\d+\.\d+)", line)]
    assert line.startswith("round 0 blocklm.model.banked_triton") and len(nums) == 4
    decay_prep, fwd_h, ret, call = nums
    assert 0 < decay_prep < fwd_h < call and ret < call
