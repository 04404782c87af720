"""bench_add_norm's arguments and its refusal without CUDA (the timing itself needs an H200)."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

from blocklm.tools.bench_add_norm import bench_add_norm, parse_shape


def test_shapes_parse():
    assert parse_shape("84000x768:bf16") == (84000, 768, torch.bfloat16)
    assert parse_shape("5X16:fp32") == (5, 16, torch.float32)


@pytest.mark.parametrize("bad", ["84000x768", "84000:bf16", "0x768:bf16", "10x10:fp16"])
def test_bad_shapes_are_named(bad):
    res = CliRunner().invoke(bench_add_norm, ["--shapes", f"10x16:bf16,{bad}"])
    assert res.exit_code == 2 and bad in res.output and "ROWSxWIDTH" in res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_refuses_without_cuda():
    res = CliRunner().invoke(bench_add_norm, [])
    assert res.exit_code == 1 and "needs a CUDA device" in res.output
