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
from torch import Tensor, nn

from .batch import to_device
from .config import ImageConfig
from .patch import PatchSupport
from .support import step_index

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
        super().__init__(d_model, self.P * self.P * CMAX, cfg.head_width, cfg.loss_chunk,
                         cfg.compile_head, cfg.fused_head)

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

    def pack(self, contents: list, shapes: list, device=None) -> tuple[Tensor, Tensor]:
        """The images' bytes copied as they are into one buffer (grouped by shape; pinned and
        sent without waiting for a CUDA device), then padded to whole patches and cut into
        steps on ``device``, one group of equal shapes at a time (buckets make a batch's shapes
        few): :meth:`encode`'s values in uint8 [B,T,E], with one plain copy per image on the
        host (a strided per-image patch copy took ~1 ms an image, the int64 encoding ~3)."""
        P, E = self.P, self.elements_per_step
        dev = torch.device(device) if device is not None else torch.device("cpu")
        grids = [self._grid(s) for s in shapes]
        n = torch.tensor([ph * pw for ph, pw in grids], dtype=torch.long)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, s in enumerate(shapes):
            groups.setdefault(tuple(s), []).append(i)
        flat = torch.empty(sum(math.prod(s) for s in shapes), dtype=torch.uint8,
                           pin_memory=dev.type == "cuda")
        buf, o = flat.numpy(), 0
        for idx in groups.values():
            for i in idx:
                img = np.asarray(contents[i]).reshape(-1)
                buf[o:o + img.size] = img
                o += img.size
        flat = flat.to(dev, non_blocking=True)  # pinned on CUDA: no wait
        out = torch.zeros(len(contents), int(n.max()) + 1, E, dtype=torch.uint8, device=dev)
        o = 0
        for (H, W, C), idx in groups.items():
            ph, pw = self._grid((H, W, C))
            g = len(idx)
            x = flat[o:o + g * H * W * C].view(g, H, W, C)
            o += g * H * W * C
            x = nn.functional.pad(x, (0, CMAX - C, 0, pw * P - W, 0, ph * P - H))
            x = x.view(g, ph, P, pw, P, CMAX).permute(0, 1, 3, 2, 4, 5).reshape(g, ph * pw, E)
            if idx == list(range(idx[0], idx[0] + g)):
                out[idx[0]:idx[0] + g, :ph * pw] = x
            else:
                out[to_device(torch.tensor(idx), dev), :ph * pw] = x
        return n, out

    def element_masks(self, shapes: list, T: int, device=None) -> Tensor:
        """[B,T,E] bool: the sub-pixels inside each image (its patches, channels < C)."""
        P = self.P
        per = to_device(torch.tensor([(h, w, c, max(self._grid((h, w, c))[1], 1))
                                      for h, w, c in shapes]), device)
        H, W, C, pw = per[:, :, None, None].unbind(1)  # [B,1,1] each
        t = torch.arange(T, device=device)[None, :, None]
        off = torch.arange(P, device=device)[None, None, :]
        # [B,T,P]: pixel row y of step t's patch (steps past the image: rows past H)
        rows = (t // pw) * P + off < H
        cols = (t % pw) * P + off < W  # [B,T,P]
        chans = torch.arange(CMAX, device=device)[None, :] < C[:, :, 0]  # [B,4]
        return (rows[:, :, :, None, None] & cols[:, :, None, :, None]
                & chans[:, None, None, None, :]).reshape(len(shapes), T, -1)

    def cond_batch(self, shapes: list) -> Tensor:
        c = torch.zeros(len(shapes), self.cond_dims)
        c[torch.arange(len(shapes)), torch.tensor([s[2] - 1 for s in shapes])] = 1.0
        c[:, CMAX:] = torch.tensor([[math.log1p(s[0]) / 8, math.log1p(s[1]) / 8] for s in shapes])
        return c

    def positions_flat(self, shapes: list, n: Tensor) -> Tensor:
        t = step_index(n)  # as positions_of, for every block's n + 1 steps at once
        pw = torch.repeat_interleave(torch.tensor([max(self._grid(s)[1], 1) for s in shapes]),
                                     n + 1)
        return torch.stack([(t // pw) * self.P, (t % pw) * self.P], -1).float()

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
