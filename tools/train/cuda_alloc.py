"""The CUDA caching allocator's settings for a run (``train.cuda_alloc``).

PyTorch reads ``PYTORCH_CUDA_ALLOC_CONF`` from the environment; a run's settings belong in its
config instead (no configuration through environment variables), so the trainer applies
``train.cuda_alloc`` itself through PyTorch's runtime call. The settings are the process's
(the allocator is one per process), and they stay after the fit, like ``torch.backends`` flags.

No preset sets it. Measured on the H200 (GPU_NOTES P126-P129): the defaults had run out of
memory at optimizer step ~134 of ``bench train`` on ``data/gpu_mixed4`` (a [1536, state_size]
fp32 state tensor, 6.96 GiB, could not be placed with 25.8 GiB reserved but free) after the
stack graphs' captures stopped emptying the cache; ``max_split_size_mb:4096`` (blocks over
4 GiB never split) then ran out of memory within 10 steps (49 GiB of whole blocks held while
a capture, which may not release them, asked for 60 MiB), and beside captures that empty the
cache it ran 5% slower than without (224,766 / 227,525 against 239,065 real tokens/s, 80 s
windows). The fix was the captures' (``model/stack_runners.py``, ``GraphRunner._capture``); this stays for runs
whose data fragments the cache otherwise.
"""

from __future__ import annotations

import torch


def check_alloc_settings(settings: str | None) -> None:
    """Refuse settings that are not ``key:value`` pairs separated by commas (PyTorch's
    syntax), before a run starts, with the setting's name in the message."""
    if settings is None:
        return
    if not isinstance(settings, str) or not settings.strip():
        raise ValueError(f"train.cuda_alloc must be a string like 'max_split_size_mb:4096' "
                         f"or none, got {settings!r}")
    for part in settings.split(","):
        key, sep, value = part.partition(":")
        if not sep or not key.strip() or not value.strip():
            raise ValueError(f"train.cuda_alloc: {part!r} is not key:value (PyTorch's "
                             f"PYTORCH_CUDA_ALLOC_CONF syntax, e.g. 'max_split_size_mb:4096')")


def apply_alloc_settings(settings: str | None, device: torch.device) -> bool:
    """Apply ``settings`` to the CUDA caching allocator when ``device`` is a CUDA device;
    returns whether anything was applied (nothing on the CPU, nothing for None)."""
    check_alloc_settings(settings)
    if settings is None or device.type != "cuda":
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # PyTorch before the accelerator API
        setter = torch.cuda.memory._set_allocator_settings
    setter(settings)
    return True
