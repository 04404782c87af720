"""Sampling filters (adaptive temperature on hand values) and the exactness of the shape heads."""

from __future__ import annotations

import math

import numpy as np
import torch

from blocklm.model.config import SampleConfig
from blocklm.model.heads import ShapeHead, SizeBins
from blocklm.model.sampling import adaptive_beta, adaptive_temperature_softmax, filter_logits


def reference(logits: np.ndarray) -> np.ndarray:
    """The algorithm of design note 001, transcribed to numpy."""
    p = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    entropy = np.sum(-p * np.log(p + 1e-9))
    beta = max(np.polyval([-0.037, 0.481, -2.3, 4.917, -1.791], entropy), 1.0) \
        if entropy > 0.5 else 1.0
    z = logits * beta
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


def test_adaptive_temperature_matches_reference_on_hand_values():
    # uniform over 4: H = ln 4 = 1.386; poly(1.386) = 1.7501 (by hand) -> sharpened
    H = math.log(4)
    poly = -0.037 * H**4 + 0.481 * H**3 - 2.3 * H**2 + 4.917 * H - 1.791
    assert abs(poly - 1.7501) < 1e-3
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 0.0],
                      [0.5, 0.1, -0.3, 0.2]])
    got = adaptive_temperature_softmax(x)
    for row, g in zip(x.numpy(), got.numpy()):
        np.testing.assert_allclose(g, reference(row.astype(np.float64)), atol=1e-6)
    assert float(adaptive_beta(x[2:3])) == 1.0  # low entropy: left alone
    torch.testing.assert_close(adaptive_beta(x[1:2]), torch.tensor([[poly]]))


def test_adaptive_never_raises_entropy():
    x = torch.randn(200, 10) * 3
    def ent(p):
        return -(p * p.clamp_min(1e-12).log()).sum(-1)
    assert bool((ent(adaptive_temperature_softmax(x)) <= ent(x.softmax(-1)) + 1e-6).all())


def test_top_k_top_p_and_temperature():
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(x, SampleConfig(top_k=2))[0, 2:]).all()
    kept = ~torch.isinf(filter_logits(x, SampleConfig(top_p=0.7)))
    assert kept.tolist() == [[True, True, False, False]]  # 0.5 < 0.7 <= 0.5 + 0.3
    p = filter_logits(x, SampleConfig(temperature=0.5)).softmax(-1)
    q = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(p[0], q / q.sum())


def test_size_bins_cover_every_size_once():
    b = SizeBins(100, 12)
    sizes = torch.arange(0, 101)
    idx = b.index(sizes)
    assert idx.min() == 0 and idx.max() == b.count - 1
    assert bool((idx[1:] >= idx[:-1]).all())
    counts = torch.bincount(idx, minlength=b.count).float()
    torch.testing.assert_close(counts, b.width(torch.arange(b.count)))


def test_shape_bits_are_an_exact_distribution():
    torch.manual_seed(0)
    head = ShapeHead([("size", 30), ("choice", (1, 3, 4))], 8, 6)
    ctx = torch.randn(1, 8)
    shapes = torch.tensor([[n, c] for n in range(31) for c in (1, 3, 4)])
    bits = head.bits(ctx.expand(len(shapes), 8), shapes)
    total = torch.exp2(-bits).sum()
    torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-5, rtol=1e-5)


def test_shape_sampling_gives_sizes_inside_bins():
    torch.manual_seed(1)
    head = ShapeHead([("size", 1000), ("choice", (1, 2))], 8, 10)
    g = torch.Generator().manual_seed(0)
    shp, cls = head.predict(torch.randn(64, 8), SampleConfig(), g)
    assert bool((head.bins[0].index(shp[:, 0]) == cls[:, 0]).all())
    assert set(shp[:, 1].tolist()) <= {1, 2} and bool((shp[:, 0] <= 1000).all())
