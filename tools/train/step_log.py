"""An optimizer step's logged figures, read from the GPU a step late.

The trainer logs each step's bits per mode and head and its gradient norm. Read at once, they
made the host wait for the GPU to finish the step's whole backward pass (``blocklm:window_sums``:
23 ms of a text step on the H200, the GPU busy 22 ms of it, call P1b) before it could launch the
optimizer and go on to the next window's data work, so that work (admission, batch forming: the
data wait) then ran with the GPU idle. Here the figures are queued as one float64 tensor, copied
to pinned host memory without waiting (an event marks the copy's end), and read when the next
step has been queued, by which time they are there: the record of step n is written during step
n+1 (or at a checkpoint, an evaluation or the end of ``fit``, which flush it). The values are
the same; only the moment they are written moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class Figures:
    """Device values on their way to the host; :meth:`get` returns them as floats."""

    __slots__ = ("host", "event")

    def __init__(self, values: Tensor) -> None:
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values.detach(), non_blocking=True)
            self.event: Any = torch.cuda.Event()
            self.event.record()
        else:  # computed already: nothing to wait for
            self.host, self.event = values.detach(), None

    def get(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # the copy only, not what was queued after it
        return self.host.tolist()


@dataclass
class StepRecord:
    """What the trainer logs of step ``step``: host numbers taken at the step, and the device
    figures (``figures``: bit sums per mode and head, then the gradient norm) read later."""

    step: int
    epoch: int
    counts: list[float]  # elements per mode, predictions per head, then tokens (host numbers)
    figures: Figures | None  # None: no bits in the window (no gradient norm either)
    lr: float
    t_end: float  # time.monotonic() at the step's end
    log: bool  # a metrics record is due at this step
    dispatch: dict[str, Any] | None = field(default=None)  # dispatcher metrics, when ``log``
