"""The CUDA caching allocator's settings for a run (``train.cuda_alloc``).

PyTorch reads ``PYTORCH_CUDA_ALLOC_CONF`` from the environment; a run's settings belong in its
config instead (no configuration through environment variables), so the trainer applies
``train.cuda_alloc`` itself through PyTorch's runtime call. The settings are the process's
(the allocator is one per process), and they stay after the fit, like ``torch.backends`` flags,
until the next trainer applies its own (None: PyTorch's defaults).

`small` sets ``max_split_size_mb:6144``: blocks of 6 GiB and more are never split, so a freed
[1,536, state_size] fp32 state tensor (6.96 GiB) keeps its block whole for the next one. Without
it, small tensors placed in freed state blocks pinned them: on the H200 (GPU_NOTES P137-P141)
``bench train`` on ``data/gpu_mixed4`` ran out of memory allocating a state tensor with 19-50
GiB reserved but free in split segments (at step ~134 in 4 of 18 runs of P132-P135; with the
window state cap, ``train.window_max_state_gib``, at step 176 in both runs whose read-ahead had
nothing to decode and at ~600 in a 220 s run); with it, no run has failed (the defaults ran
823 and 996 windows over 320 and 394 s, past window 601, where the cap alone failed, at peak
122.1 GiB: P143, P147). ``max_split_size_mb:4096`` cost 3-5% of mixed throughput (P129-P135):
it also held audio's 4.06 GiB state blocks to near-exact reuse.
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
    returns whether anything was applied (nothing on the CPU). None applies PyTorch's
    defaults: each setting call resets ``max_split_size_mb``, ``roundup_power2_divisions`` and
    ``garbage_collection_threshold`` to them unless it names them, so a run after another in
    the same process (``bench train``'s variants) does not keep the earlier run's."""
    check_alloc_settings(settings)
    if device.type != "cuda":
        return False
    setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
    if setter is None:  # PyTorch before the accelerator API
        setter = torch.cuda.memory._set_allocator_settings
    setter("" if settings is None else settings)
    return True
