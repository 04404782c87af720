"""Image support: ``numpy uint8 [H, W, C]`` (C in 1..4), exact 8-bit sub-pixel likelihood.

Tokenization: the image is cut into ``patch x patch`` squares in raster order; one decoder step
per patch, whose ``patch * patch * 4`` sub-pixels (ordered row, column, channel; channels beyond
C and pixels beyond the border are padding) are predicted by the within-step autoregressive head
of :mod:`blocklm.model.patch`. A 480x320x3 image with patch 8 costs 2,400 + 1 steps instead of
460,800. Positions: (row, column) in pixels of the patch's top-left corner, from the block start.
Loss: bits per sub-pixel (H * W * C elements).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from .config import ImageConfig
from .patch import PatchSupport

CMAX = 4


class ImageSupport(PatchSupport):
    """Mode support for 8-bit images."""

    name = "image"
    position_dims = 2
    cond_dims = CMAX + 2  # one-hot channels, log height, log width
    shape_dims = ("height", "width", "channels")

    def __init__(self, cfg: ImageConfig, d_model: int) -> None:
        self.cfg = cfg
        self.P = cfg.patch
        super().__init__(d_model, self.P * self.P * CMAX, cfg.head_width, cfg.loss_chunk)

    def shape_of(self, content) -> tuple[int, ...]:
        a = np.asarray(content)
        if a.dtype != np.uint8 or a.ndim != 3 or not 1 <= a.shape[2] <= CMAX:
            raise ValueError(f"image content must be uint8 [H, W, C<=4], got {a.dtype} {a.shape}")
        return tuple(int(d) for d in a.shape)

    def _grid(self, shape) -> tuple[int, int]:
        H, W = shape[0], shape[1]
        return math.ceil(H / self.P), math.ceil(W / self.P)

    def steps(self, shape: tuple[int, ...]) -> int:
        ph, pw = self._grid(shape)
        return ph * pw + 1

    def shape_spec(self):
        return [("size", self.cfg.max_side), ("size", self.cfg.max_side),
                ("choice", tuple(range(1, CMAX + 1)))]

    def positions_of(self, shape, T: int) -> Tensor:
        ph, pw = self._grid(shape)
        t = torch.arange(T)
        # the summary step (t == ph*pw) lands one patch row below the image
        return torch.stack([(t // max(pw, 1)) * self.P, (t % max(pw, 1)) * self.P], -1).float()

    def cond_of(self, shape) -> Tensor:
        c = torch.zeros(self.cond_dims)
        c[shape[2] - 1] = 1.0
        c[CMAX] = math.log1p(shape[0]) / 8
        c[CMAX + 1] = math.log1p(shape[1]) / 8
        return c

    def _patchify(self, a: np.ndarray) -> np.ndarray:
        """[ph*P, pw*P, 4] -> [ph*pw, P*P*4] in raster order of patches."""
        P = self.P
        ph, pw = a.shape[0] // P, a.shape[1] // P
        return a.reshape(ph, P, pw, P, CMAX).transpose(0, 2, 1, 3, 4).reshape(ph * pw, -1)

    def encode(self, content) -> tuple[Tensor, Tensor]:
        H, W, C = self.shape_of(content)
        ph, pw = self._grid((H, W, C))
        vals = np.zeros((ph * self.P, pw * self.P, CMAX), np.uint8)
        vals[:H, :W, :C] = content
        mask = np.zeros(vals.shape, bool)
        mask[:H, :W, :C] = True
        return (torch.from_numpy(self._patchify(vals).astype(np.int64)),
                torch.from_numpy(self._patchify(mask)))

    def element_mask(self, shape, t: int) -> Tensor:
        H, W, C = shape
        P = self.P
        _, pw = self._grid(shape)
        r0, c0 = (t // pw) * P, (t % pw) * P
        r = torch.arange(P)[:, None, None] + r0
        c = torch.arange(P)[None, :, None] + c0
        ch = torch.arange(CMAX)[None, None, :]
        return ((r < H) & (c < W) & (ch < C)).flatten()

    def assemble(self, elements: Tensor, shape):
        """[n,E] -> uint8 [H,W,C]."""
        H, W, C = shape
        ph, pw = self._grid(shape)
        P = self.P
        a = elements.cpu().numpy().astype(np.uint8).reshape(ph, pw, P, P, CMAX)
        a = a.transpose(0, 2, 1, 3, 4).reshape(ph * P, pw * P, CMAX)
        return np.ascontiguousarray(a[:H, :W, :C])
