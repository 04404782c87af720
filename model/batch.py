"""A batch of blocks on its way to the device: :class:`BlockBatch` (what a mode support's
``target`` makes) and :func:`to_device` (small host tensors without a stream wait)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class BlockBatch:
    """A batch of blocks of one mode, ready for the decoder (T = longest block's steps)."""

    mode: str
    shapes: list[tuple[int, ...]]
    inputs: Tensor  # [B,T,E] long: the previous step's elements (zeros at the start step)
    start: Tensor  # [B,T] bool: the start-token step (t == 0)
    positions: Tensor  # [B,T,P] float: coordinates, from the block start, of what step t predicts
    cond: Tensor  # [B,C] float: per-block conditioning from the shape (may be [B,0])
    targets: Tensor  # [B,T,E] long
    mask: Tensor  # [B,T,E] bool: the element counts toward the loss (padding never does)
    steps: Tensor  # [B,T] bool: real decoder steps, a prefix (includes the summary step)
    elements: Tensor  # [B] float: what bits are reported per (characters, sub-pixels, samples)
    # the real steps of each block (``steps``' row sums) as host ints: the decoder's layers
    # may then skip the padding steps without reading the mask back from the device
    lengths: tuple[int, ...] | None = None

    def to(self, device) -> BlockBatch:
        """The same batch on ``device`` (CUDA: through pinned memory, without waiting)."""
        dev = torch.device(device) if device is not None else None
        pin = dev is not None and dev.type == "cuda"

        def move(v):
            if not isinstance(v, Tensor) or dev is None or v.device == dev:
                return v
            if pin and v.device.type == "cpu" and v.is_pinned():  # written there (pack)
                return v.to(dev, non_blocking=True)
            # small tensors only: pinning a large one costs a pinned allocation (cudaHostAlloc,
            # ~20 ms for an image batch's inputs in the thru-final profile) and a host copy
            if pin and v.device.type == "cpu" and v.numel() * v.element_size() <= 1 << 22:
                return to_device(v, dev)
            return v.to(dev)
        return BlockBatch(**{k: move(v) for k, v in self.__dict__.items()})


def to_device(t: Tensor, device) -> Tensor:
    """A small host tensor on ``device`` without waiting for the GPU: through pinned memory
    on CUDA (a copy from pageable memory synchronises the stream)."""
    device = torch.device(device) if device is not None else t.device
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)
