"""Launch counts by source (bench train --trace): a backward launch is charged to its autograd
node, a forward one to the outermost aten op around it."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.profiler as tp

from blocklm.tools.bench_train_launches import count_launches, launch_table


class _Twice(torch.autograd.Function):
    """A backward of exactly two leaf aten ops (add, neg)."""

    @staticmethod
    def forward(ctx, x):
        return x + x

    @staticmethod
    def backward(ctx, g):
        return torch.add(g, g).neg()


def _ev(name, parent=None):
    e = SimpleNamespace(name=name, cpu_parent=parent, cpu_children=[])
    if parent is not None:
        parent.cpu_children.append(e)
    return e


def test_cuda_launches_go_to_their_backward_node_or_forward_op():
    node = _ev("autograd::engine::evaluate_function: AddmmBackward0")
    mm = _ev("aten::mm", _ev("AddmmBackward0", node))
    lin = _ev("aten::linear")
    addmm = _ev("aten::addmm", lin)
    evs = [node, mm, lin, addmm, _ev("cudaLaunchKernel", mm), _ev("cudaLaunchKernel", mm),
           _ev("cuLaunchKernelEx", addmm), _ev("cudaGraphLaunch"), _ev("aten::zeros")]
    total, by, cuda = count_launches(evs)
    assert cuda and total == 4
    assert by == {("backward", "AddmmBackward0"): 2, ("forward", "aten::linear"): 1,
                  ("forward", "cudaGraphLaunch"): 1}
    text = launch_table("t", total, by, cuda)
    assert "runtime launches: 4" in text and "AddmmBackward0" in text


def test_cpu_profile_counts_leaf_ops_by_node():
    x = torch.randn(8, requires_grad=True)
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        y = _Twice.apply(x)
        y.sum().backward()
    total, by, cuda = count_launches(prof.events())
    assert not cuda
    assert by[("backward", "_TwiceBackward")] == 2  # add, neg: the leaves under the node
    assert by[("forward", "aten::add")] == 1  # the forward's x + x
    assert total == sum(by.values())


def test_export_profile_writes_the_launch_table(tmp_path):
    from blocklm.tools.bench_train_prof import export_profile

    x = torch.randn(8, requires_grad=True)
    with tp.profile(activities=[tp.ProfilerActivity.CPU]) as prof:
        _Twice.apply(x).sum().backward()
    res = export_profile(prof, tmp_path, "run")
    text = (tmp_path / "run.launches.txt").read_text()
    assert res["launches"] == sum(n for _, _, n in res["launches_top"]) and not res["launches_cuda"]
    assert ["backward", "_TwiceBackward", 2] in res["launches_top"] and "_TwiceBackward" in text
