"""Audio support: ``numpy`` int16 or float32 ``[frames, channels]`` (or ``(array, rate)``).

Samples are companded to 8-bit mu-law (mu = 255) and the likelihood is exact over those 256
levels. Tokenization: one decoder step per frame of ``frame`` consecutive samples x
``max_channels`` (channel fastest; absent channels and the tail beyond the last sample are
padding), predicted by the within-step autoregressive head of :mod:`blocklm.model.patch`.
Positions: the sample index of the frame's first sample, from the block start. Loss: bits per
sample (frames * channels elements). Generated audio is int16 ``[frames, channels]`` (the
mu-law levels decoded); the sample rate is not modelled (it travels in block metadata).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .batch import to_device
from .config import AudioConfig
from .patch import PatchSupport
from .support import step_index


def mu_law_encode(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """Float samples in [-1, 1] -> levels 0..mu (uint8 for mu = 255)."""
    x = np.clip(x, -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((y + 1.0) / 2.0 * mu + 0.5).astype(np.int64)


def mu_law_decode(q: np.ndarray, mu: int = 255) -> np.ndarray:
    """Levels 0..mu -> float samples in [-1, 1]."""
    y = 2.0 * q.astype(np.float64) / mu - 1.0
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def samples_of(content) -> np.ndarray:
    """The content's samples as they are: int16 or float [frames, channels] (a 1-D array is one
    channel; ``(array, rate)`` its array); anything else is a ValueError."""
    if isinstance(content, tuple):
        content = content[0]
    a = np.asarray(content)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"audio content must be [frames, channels], got shape {a.shape}")
    if a.dtype != np.int16 and a.dtype.kind != "f":
        raise ValueError(f"audio content must be int16 or float, got {a.dtype}")
    return a


def as_float(samples) -> np.ndarray:
    """int16 / float audio [frames, channels] (or [frames]) -> float64 in [-1, 1], 2-D."""
    a = samples_of(samples)
    if a.dtype == np.int16:
        return a.astype(np.float64) / 32768.0
    return a.astype(np.float64)


@functools.cache
def _level_table() -> np.ndarray:
    """uint8 [65536]: the mu-law level of each int16 sample, indexed by its bit pattern."""
    every = np.arange(65536, dtype=np.uint16).view(np.int16)
    return mu_law_encode(every.astype(np.float64) / 32768.0).astype(np.uint8)


def int16_levels(a: np.ndarray) -> np.ndarray:
    """:func:`mu_law_encode` of int16 samples as uint8, by a table of all 65,536 values (the
    same float64 arithmetic, done once) instead of the formula for every sample."""
    return _level_table()[a.view(np.uint16)]


@dataclass(frozen=True)
class Levels:
    """A clip's mu-law levels, uint8 [frames, channels], worked out ahead of its batch by
    :meth:`AudioSupport.prepare` (the trainer's read-ahead thread, off the model's thread)."""

    levels: np.ndarray


def levels_of(content, mu: int = 255) -> np.ndarray:
    """A clip's mu-law levels as uint8 [frames, channels]: int16 samples through
    :func:`int16_levels`, float samples through :func:`mu_law_encode`, :class:`Levels` as made."""
    if isinstance(content, Levels):
        return content.levels
    x = samples_of(content)
    return int16_levels(x) if x.dtype == np.int16 else \
        mu_law_encode(as_float(x), mu).astype(np.uint8)


class AudioSupport(PatchSupport):
    """Mode support for mu-law audio."""

    name = "audio"
    position_dims = 1
    shape_dims = ("frames", "channels")

    def __init__(self, cfg: AudioConfig, d_model: int) -> None:
        if cfg.mu != 255:
            raise ValueError("8-bit mu-law needs mu = 255")
        self.cfg = cfg
        self.cond_dims = cfg.max_channels
        super().__init__(d_model, cfg.frame * cfg.max_channels, cfg.head_width,
                         cfg.loss_chunk, cfg.compile_head, cfg.fused_head)

    def prepare(self, content) -> Levels:
        """The clip's mu-law levels (:class:`Levels`), for :meth:`pack` to copy as they are:
        on the H200 the levels' table lookup was ~2% of the model thread's time in a mixed
        window (py-spy, GPU_NOTES P121), in the batch's set-up where the GPU waits."""
        self.shape_of(content)
        if isinstance(content, Levels):
            return content
        return Levels(levels_of(content, self.cfg.mu))

    def shape_of(self, content) -> tuple[int, ...]:
        # the shape without a float copy of the samples
        a = content.levels if isinstance(content, Levels) else samples_of(content)
        if a.shape[1] > self.cfg.max_channels or a.shape[1] < 1:
            raise ValueError(f"audio has {a.shape[1]} channels; 1..{self.cfg.max_channels} "
                             "are supported")
        return (int(a.shape[0]), int(a.shape[1]))

    def steps(self, shape: tuple[int, ...]) -> int:
        return math.ceil(shape[0] / self.cfg.frame) + 1

    def shape_spec(self):
        return [("size", self.cfg.max_frames), ("choice", tuple(range(1, self.cfg.max_channels + 1)))]

    def positions_of(self, shape, T: int) -> Tensor:
        return (torch.arange(T) * self.cfg.frame).float()[:, None]

    def cond_of(self, shape) -> Tensor:
        c = torch.zeros(self.cond_dims)
        c[shape[1] - 1] = 1.0
        return c

    def pack(self, contents: list, shapes: list, device=None) -> tuple[Tensor, Tensor]:
        """Each clip's mu-law levels written straight into the batch's uint8 [B,T,E] on the
        host, pinned for a CUDA ``device`` (int16 clips through :func:`int16_levels`; no int64
        copy, no host mask); :meth:`encode`'s values."""
        pin = device is not None and torch.device(device).type == "cuda"
        F, Cm = self.cfg.frame, self.cfg.max_channels
        n = torch.tensor([math.ceil(fr / F) for fr, _ in shapes], dtype=torch.long)
        out = torch.zeros(len(contents), int(n.max()) + 1, F * Cm, dtype=torch.uint8,
                          pin_memory=pin)
        a = out.numpy()
        for i, (c, (fr, ch), k) in enumerate(zip(contents, shapes, n.tolist())):
            # step t, element f*Cm + c: sample t*F+f
            a[i, :k].reshape(k * F, Cm)[:fr, :ch] = levels_of(c, self.cfg.mu)
        return n, out

    def element_masks(self, shapes: list, T: int, device=None) -> Tensor:
        """[B,T,E] bool: the samples inside each clip (frames, channels < its channels)."""
        F, Cm = self.cfg.frame, self.cfg.max_channels
        fr, ch = to_device(torch.tensor(shapes, dtype=torch.long).view(-1, 2), device).unbind(1)
        f = torch.arange(T, device=device)[:, None] * F + torch.arange(F, device=device)
        frames = f[None] < fr[:, None, None]  # [B,T,F]
        chans = torch.arange(Cm, device=device)[None, :] < ch[:, None]  # [B,Cm]
        return (frames[..., None] & chans[:, None, None, :]).reshape(len(shapes), T, F * Cm)

    def cond_batch(self, shapes: list) -> Tensor:
        c = torch.zeros(len(shapes), self.cond_dims)
        c[torch.arange(len(shapes)), torch.tensor([s[1] - 1 for s in shapes])] = 1.0
        return c

    def positions_flat(self, shapes: list, n: Tensor) -> Tensor:
        return (step_index(n) * self.cfg.frame).float()[:, None]  # positions_of, all at once

    def encode(self, content) -> tuple[Tensor, Tensor]:
        frames, ch = self.shape_of(content)
        F, Cm = self.cfg.frame, self.cfg.max_channels
        n = math.ceil(frames / F)
        vals = np.zeros((n * F, Cm), np.int64)
        vals[:frames, :ch] = mu_law_encode(as_float(content), self.cfg.mu) \
            if not isinstance(content, Levels) else content.levels
        mask = np.zeros(vals.shape, bool)
        mask[:frames, :ch] = True
        return (torch.from_numpy(vals.reshape(n, F * Cm)),
                torch.from_numpy(mask.reshape(n, F * Cm)))

    def element_mask(self, shape, t: int) -> Tensor:
        frames, ch = shape
        f = torch.arange(self.cfg.frame)[:, None] + t * self.cfg.frame
        c = torch.arange(self.cfg.max_channels)[None, :]
        return ((f < frames) & (c < ch)).flatten()

    def assemble(self, elements: Tensor, shape):
        """[n,E] -> int16 [frames, channels]."""
        frames, ch = shape
        q = elements.cpu().numpy().reshape(-1, self.cfg.max_channels)[:frames, :ch]
        return np.clip(np.round(mu_law_decode(q, self.cfg.mu) * 32767), -32768, 32767
                       ).astype(np.int16)
