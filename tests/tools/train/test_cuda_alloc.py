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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_allocator_takes_the_setting_on_cuda():
    assert apply_alloc_settings("max_split_size_mb:4096", torch.device("cuda"))
    x = torch.empty(1, device="cuda")  # the allocator is initialised
    assert torch.cuda.memory_stats()["max_split_size"] == 4096 * 2 ** 20
    assert apply_alloc_settings(None, torch.device("cuda"))  # back to PyTorch's default
    assert torch.cuda.memory_stats()["max_split_size"] != 4096 * 2 ** 20
    del x
