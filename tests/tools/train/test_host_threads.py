"""The trainer's CPU threads (loop_util.HostThreads, ``train.host_threads``): set for a fit and
restored after; one thread on a CUDA device unless configured, torch's default on the CPU."""

from __future__ import annotations

import pytest
import torch

from blocklm.tools.train.loop_util import HostThreads, host_threads


def test_threads_are_set_for_the_fit_and_restored():
    before = torch.get_num_threads()
    with HostThreads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with HostThreads(None):  # unchanged
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before


def test_restored_when_the_fit_raises():
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError), HostThreads(1):
        raise RuntimeError("a failed step")
    assert torch.get_num_threads() == before


def test_the_default_is_one_thread_on_cuda_only():
    assert host_threads(None, "cuda") == 1
    assert host_threads(None, "cpu") is None
    assert host_threads(3, "cuda") == 3 and host_threads(2, "cpu") == 2


@pytest.mark.parametrize("bad", ["0", "-2"])
def test_a_bad_number_is_refused_when_the_config_is_built(bad):
    from blocklm.tools.train.config import build_config
    assert build_config("tiny", ["train.host_threads=3"]).train.host_threads == 3
    with pytest.raises(ValueError, match="train.host_threads"):
        build_config("tiny", [f"train.host_threads={bad}"])


def test_fit_enters_host_threads_with_the_resolved_number(monkeypatch):
    """The trainer's fit runs inside HostThreads with ``train.host_threads`` resolved for its
    device (None on the CPU: torch's threads compute the model there)."""
    from blocklm.tools.train import loop

    seen, inside = [], []
    real = loop.HostThreads

    class Spy(real):
        def __init__(self, n):
            seen.append(n)
            super().__init__(n)
    monkeypatch.setattr(loop, "HostThreads", Spy)
    tr = object.__new__(loop.Trainer)  # fit's own logic only: no model, no data
    tr.t = type("T", (), {"host_threads": None, "full_gc_every": 500})()
    tr.source = None
    tr._fit = lambda steps, minutes: inside.append(torch.get_num_threads()) or {"ok": True}
    before = torch.get_num_threads()
    for device, n in (("cpu", None), ("cuda", None), ("cpu", 2)):
        tr.device, tr.t.host_threads = torch.device(device), n
        assert loop.Trainer.fit(tr, steps=1, minutes=None) == {"ok": True}
    assert seen == [None, 1, 2] and inside == [before, 1, 2]
    assert torch.get_num_threads() == before


def test_the_runners_are_built_under_the_fits_threads(tmp_path, monkeypatch):
    """On CUDA the runners compile the heads' graphs when they are built, and a compiled graph
    guards on torch's thread count: built under another number than the fit's, each graph was
    compiled again at the fit's first batch (GPU_NOTES P67). So the trainer builds them under
    ``train.host_threads``, and restores the number after."""
    from blocklm.formats import Sample, ShardWriter, text_block
    from blocklm.tools.train import loop

    with ShardWriter(tmp_path / "d", max_samples=8) as w:
        for i in range(4):
            w.write(Sample(f"t{i}", [text_block("hello, world")]))
    seen = []

    class Spy(loop.ModelRunners):
        def __init__(self, *a, **k):
            seen.append(torch.get_num_threads())
            super().__init__(*a, **k)
    monkeypatch.setattr(loop, "ModelRunners", Spy)
    before = torch.get_num_threads()
    n = 1 if before != 1 else 2
    spec = loop.RunSpec("tiny", [str(tmp_path / "d")], None,
                        [f"train.host_threads={n}", "model.modes.text.tokenizer_path=none",
                         "model.modes.text.vocab_size=300"])
    loop.Trainer(tmp_path / "run", spec, resume=False, remote=None, progress=False,
                 tensorboard=False)
    assert seen == [n] and torch.get_num_threads() == before
