"""Under torchrun with CUDA, each process takes the GPU named by LOCAL_RANK (not cuda:0)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from blocklm.tools.train import distributed


def test_each_rank_takes_its_local_gpu(monkeypatch):
    chosen: list[int] = []
    monkeypatch.setattr(dist, "is_torchelastic_launched", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.init_from_launcher() is True
    assert chosen == [1]


def test_cpu_collectives_have_a_backend_next_to_nccl(monkeypatch):
    backends: list[str] = []
    monkeypatch.setattr(dist, "is_torchelastic_launched", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", backends.append)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: None)
    monkeypatch.setenv("LOCAL_RANK", "0")
    distributed.init_from_launcher()
    assert backends == ["cpu:gloo,cuda:nccl"]


def test_train_leaves_the_launcher_group_after_the_run(monkeypatch, tmp_path):
    """The process group is destroyed when the run ends (after a barrier), also when it fails
    (without one): left to the interpreter's exit, a gloo rank once aborted after its last step
    (SIGABRT in CI)."""
    import pytest

    from blocklm.tools.train import loop

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_torchelastic_launched", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))

    class Done:
        def __init__(self, *a, **k) -> None:
            pass

        def fit(self, **k):
            return {"step": 2}

    class Fails(Done):
        def fit(self, **k):
            raise RuntimeError("a rank failed")

    monkeypatch.setattr(loop, "Trainer", Done)
    assert loop.train(tmp_path / "run") == {"step": 2}
    assert calls == ["barrier", "destroy"]
    monkeypatch.setattr(loop, "Trainer", Fails)
    with pytest.raises(RuntimeError, match="a rank failed"):
        loop.train(tmp_path / "run")
    assert calls == ["barrier", "destroy", "destroy"]  # after a failure: no barrier
