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

import math

import numpy as np
import torch
from torch import Tensor

from .config import AudioConfig
from .patch import PatchSupport


def mu_law_encode(x: np.ndarray, mu: int = 255) -> np.ndarray:
    """Float samples in [-1, 1] -> levels 0..mu (uint8 for mu = 255)."""
    x = np.clip(x, -1.0, 1.0)
    y = np.sign(x) * np.log1p(mu * np.abs(x)) / np.log1p(mu)
    return np.floor((y + 1.0) / 2.0 * mu + 0.5).astype(np.int64)


def mu_law_decode(q: np.ndarray, mu: int = 255) -> np.ndarray:
    """Levels 0..mu -> float samples in [-1, 1]."""
    y = 2.0 * q.astype(np.float64) / mu - 1.0
    return np.sign(y) * np.expm1(np.abs(y) * np.log1p(mu)) / mu


def as_float(samples) -> np.ndarray:
    """int16 / float audio [frames, channels] (or [frames]) -> float64 in [-1, 1], 2-D."""
    if isinstance(samples, tuple):
        samples = samples[0]
    a = np.asarray(samples)
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2:
        raise ValueError(f"audio content must be [frames, channels], got shape {a.shape}")
    if a.dtype == np.int16:
        return a.astype(np.float64) / 32768.0
    if a.dtype.kind == "f":
        return a.astype(np.float64)
    raise ValueError(f"audio content must be int16 or float, got {a.dtype}")


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
                         cfg.loss_chunk)

    def shape_of(self, content) -> tuple[int, ...]:
        a = as_float(content)
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

    def encode(self, content) -> tuple[Tensor, Tensor]:
        a = as_float(content)
        frames, ch = self.shape_of(content)
        F, Cm = self.cfg.frame, self.cfg.max_channels
        n = math.ceil(frames / F)
        vals = np.zeros((n * F, Cm), np.int64)
        vals[:frames, :ch] = mu_law_encode(a, self.cfg.mu)
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
