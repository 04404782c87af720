"""Next-mode and shape heads, read from the block summary kept in the decoder state.

After each block (and before the first) the model predicts the next block's mode among the
registered modes plus ``end`` (end of example) and then, given the mode, the block's shape, one
entry at a time (each conditioned on the earlier ones). Shape entries are either sizes, over
log-spaced bins with a uniform distribution inside a bin (so the shape's bits are an exact
discrete likelihood: bin bits + log2(bin width)), or a choice among a few values (channels).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .batch import to_device
from .config import HeadsConfig, SampleConfig
from .sampling import sample_logits
from .support import LN2

END = "end"


class SizeBins:
    """Bin 0 holds size 0; bins 1.. cover [1, max] with log-spaced integer edges."""

    def __init__(self, max_size: int, bins: int) -> None:
        geo = np.floor(np.logspace(0, math.log10(max_size + 1), bins))
        edges = np.unique(np.concatenate([[0, 1], geo, [max_size + 1]]).astype(np.int64))
        self.edges = torch.tensor(edges, device="cpu")  # ascending; bin k = [e[k], e[k+1])
        self.count = len(edges) - 1
        self._on: dict[torch.device, Tensor] = {}  # edges per device, copied once

    def _edges(self, device: torch.device) -> Tensor:
        # a host-to-GPU copy per call made the host wait for the GPU each time (3 per batch)
        if device not in self._on:
            self._on[device] = self.edges.to(device)
        return self._on[device]

    def index(self, sizes: Tensor) -> Tensor:
        """Sizes [B] -> bin indices [B] (sizes beyond max land in the last bin)."""
        i = torch.searchsorted(self._edges(sizes.device), sizes.contiguous(), right=True) - 1
        return i.clamp(0, self.count - 1)

    def width(self, idx: Tensor) -> Tensor:
        e = self._edges(idx.device)
        return (e[idx + 1] - e[idx]).float()

    def draw(self, idx: Tensor, generator: torch.Generator | None) -> Tensor:
        """A uniform integer inside each bin."""
        e = self._edges(idx.device)
        u = torch.rand(idx.shape, generator=generator, device=idx.device)
        return e[idx] + (u * self.width(idx)).long().clamp(max=(self.width(idx) - 1).long())


class ShapeHead(nn.Module):
    """Autoregressive distribution over one mode's shape entries."""

    def __init__(self, spec: list[tuple[str, object]], hidden: int, bins: int) -> None:
        super().__init__()
        self.spec = spec
        self.bins = [SizeBins(int(arg), bins) if kind == "size" else None for kind, arg in spec]
        sizes = [b.count if b is not None else len(arg) for b, (_, arg) in zip(self.bins, spec)]
        self.inp = nn.Linear(hidden, hidden)
        self.prev = nn.ModuleList(nn.Embedding(n, hidden) for n in sizes[:-1])  # feeds later entries
        self.out = nn.ModuleList(nn.Linear(hidden, n) for n in sizes)

    def classes(self, shapes: Tensor, checked: bool = False) -> Tensor:
        """Shapes [B,D] -> class index per entry [B,D]. ``checked``: the caller has checked
        the choice entries on the host (the check here reads the device: a GPU wait)."""
        cols = []
        for j, (kind, arg) in enumerate(self.spec):
            v = shapes[:, j]
            if kind == "size":
                cols.append(self.bins[j].index(v))
            else:
                table = to_device(torch.tensor(arg), v.device)
                hit = v[:, None] == table
                if not checked and not bool(hit.any(1).all()):
                    raise ValueError(f"shape entry {j} has a value outside {arg}")
                cols.append(hit.long().argmax(1))
        return torch.stack(cols, 1)

    def check(self, shapes: list[tuple[int, ...]]) -> None:
        """Raise ValueError if a choice entry of a shape is not among its values (host)."""
        for j, (kind, arg) in enumerate(self.spec):
            if kind != "size":
                bad = [s[j] for s in shapes if s[j] not in arg]
                if bad:
                    raise ValueError(f"shape entry {j} has a value outside {arg}: {bad[0]}")

    def bits(self, ctx: Tensor, shapes: Tensor, checked: bool = False) -> Tensor:
        """ctx [B,hidden], shapes [B,D] long -> exact bits of each shape [B]."""
        cls = self.classes(shapes, checked)
        c = torch.tanh(self.inp(ctx))
        total = torch.zeros(ctx.shape[0], device=ctx.device)
        for j in range(len(self.spec)):
            logp = self.out[j](c).float().log_softmax(-1)
            total = total - logp.gather(1, cls[:, j:j + 1])[:, 0] / LN2
            if self.bins[j] is not None:
                total = total + torch.log2(self.bins[j].width(cls[:, j]))
            if j < len(self.prev):
                c = c + self.prev[j](cls[:, j])
        return total

    def predict(self, ctx: Tensor, cfg: SampleConfig | None, generator) -> tuple[Tensor, Tensor]:
        """Sample (or, with cfg None, take the most likely class of) each entry.

        Returns shapes [B,D] long and the classes [B,D] chosen.
        """
        c = torch.tanh(self.inp(ctx))
        vals, classes = [], []
        for j, (kind, arg) in enumerate(self.spec):
            logits = self.out[j](c)
            k = logits.argmax(-1) if cfg is None else sample_logits(logits, cfg, generator)
            if kind == "size":
                v = (self.bins[j].edges.to(k.device)[k] if cfg is None
                     else self.bins[j].draw(k, generator))
            else:
                v = torch.tensor(arg, device=k.device)[k]
            vals.append(v)
            classes.append(k)
            if j < len(self.prev):
                c = c + self.prev[j](k)
        return torch.stack(vals, 1), torch.stack(classes, 1)


class Heads(nn.Module):
    """Next-mode head (registered modes + end) and one shape head per mode."""

    def __init__(self, cfg: HeadsConfig, d_model: int, specs: dict[str, list]) -> None:
        super().__init__()
        self.names = list(specs) + [END]
        self.trunk = nn.Sequential(nn.Linear(d_model, cfg.hidden), nn.GELU())
        self.mode_out = nn.Linear(cfg.hidden, len(self.names))
        self.shape = nn.ModuleDict({m: ShapeHead(s, cfg.hidden, cfg.bins) for m, s in specs.items()})

    def mode_logits(self, summary: Tensor) -> Tensor:
        """summary [B,d_model] -> logits over modes + end [B,M+1]."""
        return self.mode_out(self.trunk(summary))

    def mode_bits(self, summary: Tensor, modes: list[str]) -> Tensor:
        """Bits of the true next modes [B]."""
        # built on the host and sent without waiting (torch.tensor(..., device=cuda) from a
        # list synchronises the stream: one GPU wait per batch)
        idx = to_device(torch.tensor([self.names.index(m) for m in modes]), summary.device)
        logp = self.mode_logits(summary).float().log_softmax(-1)
        return -logp.gather(1, idx[:, None])[:, 0] / LN2

    def shape_bits(self, summary: Tensor, mode: str, shapes: list[tuple[int, ...]]) -> Tensor:
        """Bits of the true shapes [B] of blocks of ``mode``."""
        head = self.shape[mode]
        head.check(shapes)
        s = torch.tensor(shapes, dtype=torch.long).view(len(shapes), -1)
        return head.bits(self.trunk(summary), to_device(s, summary.device), True)
