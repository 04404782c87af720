"""train.cuda_alloc: the allocator's settings checked with the config and applied on CUDA."""

import pytest
import torch

from blocklm.tools.train.config import build_config
from blocklm.tools.train.cuda_alloc import apply_alloc_settings, check_alloc_settings


def test_small_sets_it_and_overrides_parse():
    # blocks of 6 GiB and more never split: the 1,536-example state tensors (GPU_NOTES P137-P140)
    assert build_config("small").train.cuda_alloc == "max_split_size_mb:6144"
    assert build_config("tiny").train.cuda_alloc is None
    cfg = build_config("small", ["train.cuda_alloc=max_split_size_mb:1024,roundup_power2_divisions:4"])
    assert cfg.train.cuda_alloc == "max_split_size_mb:1024,roundup_power2_divisions:4"
    assert build_config("small", ["train.cuda_alloc=none"]).train.cuda_alloc is None


@pytest.mark.parametrize("bad", ["oops", "max_split_size_mb:", ":4096", "a:1,,b:2", "", 4096])
def test_malformed_settings_are_refused_naming_the_setting(bad):
    with pytest.raises(ValueError, match="train.cuda_alloc"):
        check_alloc_settings(bad)
    if isinstance(bad, str):
        with pytest.raises(ValueError, match="train.cuda_alloc"):
            build_config("small", [f"train.cuda_alloc={bad}"] if bad else ["train.cuda_alloc="])


def test_applied_only_on_cuda(monkeypatch):
    calls = []
    monkeypatch.setattr(torch._C, "_accelerator_setAllocatorSettings", calls.append, raising=False)
    assert not apply_alloc_settings("max_split_size_mb:4096", torch.device("cpu"))
    assert not apply_alloc_settings(None, torch.device("cpu"))
    assert calls == []
    assert apply_alloc_settings("max_split_size_mb:4096", torch.device("cuda"))
    # None: PyTorch's defaults again (a setting call resets what it does not name), not the
    # earlier run's settings kept for the rest of the process
    assert apply_alloc_settings(None, torch.device("cuda"))
    assert calls == ["max_split_size_mb:4096", ""]


_SPLITS = """
import torch
from blocklm.tools.train.cuda_alloc import apply_alloc_settings

def splits(setting):
    # a freed 128 MiB block, then a 32 MiB tensor: the block is split for it, or (blocks of
    # max_split_size and more are never split) the allocator reserves a new segment
    apply_alloc_settings(setting, torch.device("cuda"))
    torch.cuda.empty_cache()
    big = torch.empty(128 << 20, dtype=torch.uint8, device="cuda")
    del big
    before = torch.cuda.memory_reserved()
    small = torch.empty(32 << 20, dtype=torch.uint8, device="cuda")
    grew = torch.cuda.memory_reserved() > before
    del small
    return not grew

print([splits(s) for s in (None, "max_split_size_mb:64", None, "max_split_size_mb:64")])
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_allocator_takes_each_setting_on_cuda():
    """The allocator follows each run's setting, and none brings PyTorch's default back (a
    fresh process: an allocator with nothing cached by other tests). ``memory_stats()``'s
    ``max_split_size`` is not a witness: PyTorch 2.11 reads it once, when the allocator starts
    (the H200, P144), so the behaviour itself is checked."""
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _SPLITS], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip().splitlines()[-1] == "[True, False, True, False]"
