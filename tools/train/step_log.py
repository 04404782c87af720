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

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .runner import HEADS


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
    figures: Figures  # bit sums per mode and head, then the gradient norm
    lr: float
    t_end: float  # time.monotonic() at the step's end
    log: bool  # a metrics record is due at this step
    dispatch: dict[str, Any] | None = field(default=None)  # dispatcher metrics, when ``log``


class StepLog:
    """The trainer's running log of optimizer steps: the losses averaged since the last record,
    the progress bar and the metrics records. :meth:`push` hands it a step's record; with
    ``lag`` it is written when the next one comes (or at :meth:`flush`), else at once."""

    def __init__(self, modes: list[str], coll: Any, log: Any, lag: bool) -> None:
        self.modes, self.coll, self.log, self.lag = modes, coll, log, lag
        self.acc: dict[str, list[float]] = {}  # mode -> bits per element of each step
        self.tokens_since, self.t_log = 0.0, time.monotonic()
        self.summary: dict[str, Any] = {}  # the last record written
        self.bar: Any = None  # a tqdm bar, while fit runs
        self._pending: StepRecord | None = None

    def push(self, rec: StepRecord) -> None:
        self.flush()  # the previous step's record: its figures are on the host by now
        self._pending = rec
        if not self.lag:
            self.flush()

    def flush(self) -> None:
        """Write the pending step's record (a no-op without one)."""
        rec, self._pending = self._pending, None
        if rec is not None:
            self._record(rec)

    def _record(self, rec: StepRecord) -> None:
        """Step ``rec.step``'s losses into the running means, the progress bar and, when due,
        the metrics log (every rank takes part: the bit sums are summed over ranks)."""
        vals = rec.figures.get()
        bits, grad_norm, counts = self.coll.sum(vals[:-1]), vals[-1], rec.counts
        nm = len(self.modes)
        sums = [v for pair in zip(bits, counts) for v in pair] + [counts[-1]]
        heads = {k: (sums[2 * (nm + j)], sums[2 * (nm + j) + 1]) for j, k in enumerate(HEADS)}
        self.tokens_since += sums[-1]
        for i, m in enumerate(self.modes):
            if sums[2 * i + 1] > 0:
                self.acc.setdefault(m, []).append(sums[2 * i] / sums[2 * i + 1])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix({m: f"{v[-1]:.3f}" for m, v in self.acc.items()})
        if rec.log:
            self.summary = {
                "step": rec.step, "epoch": rec.epoch,
                "loss": {m: float(np.mean(v)) for m, v in self.acc.items()},
                "heads_bits": {k: b / max(c, 1.0) for k, (b, c) in heads.items()},
                "grad_norm": grad_norm, "lr": rec.lr,
                "tokens_per_s": self.tokens_since / max(rec.t_end - self.t_log, 1e-9),
                "dispatch": rec.dispatch}
            if self.log is not None:
                self.log.log(self.summary)
            self.acc, self.tokens_since, self.t_log = {}, 0.0, rec.t_end
