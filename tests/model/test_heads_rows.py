"""Content losses on the decoder's row grid (CUDA's form, forced here on the CPU): the same bits
and gradients as unpadded rows, for text (one element per step) and images (the checkpointed
within-patch slices)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blocklm.model.patch as patch
import blocklm.model.support as support
from blocklm.model.decoder import token_rows


@pytest.mark.parametrize("mode", ["text", "image", "audio"])
def test_bits_on_the_row_grid_equal_unpadded(model, monkeypatch, mode):
    rng = np.random.default_rng(0)
    contents = {"text": ["To be, or not to be", "Ay", "Good morrow, cousin."],
                "image": [rng.integers(0, 256, s, dtype=np.uint8) for s in ((5, 3, 3), (9, 7, 4))],
                "audio": [(rng.standard_normal((n, 2)) * 3000).astype(np.int16) for n in (9, 40)],
                }[mode]
    sup = model.support(mode)
    if mode != "text":
        monkeypatch.setattr(sup, "loss_chunk", 3)  # several checkpointed slices, a short last one
    batch = sup.target(contents)
    torch.manual_seed(0)
    h = torch.randn(*batch.steps.shape, model.cfg.decoder.d_model, requires_grad=True)
    out = []
    seen: list[int] = []
    for rows in (lambda n, like: n, lambda n, like: seen.append(token_rows(n)) or token_rows(n)):
        monkeypatch.setattr(support, "grid_rows", rows)
        monkeypatch.setattr(patch, "grid_rows", rows)
        bits, _ = sup.bits(h, batch)
        (g,) = torch.autograd.grad(bits.sum(), h)
        out.append((bits, g))
    assert seen and all(m % 64 == 0 for m in seen)  # the padded form ran, on grid shapes
    torch.testing.assert_close(out[1][0], out[0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][1], out[0][1], atol=1e-6, rtol=1e-5)
    assert bool((out[0][0] > 0).all())


def test_shape_bits_check_choices_on_the_host(model):
    """shape_bits checks the choice entries (channels) on the host, before any device work
    (the device-side check read the GPU: one wait per batch); the device path still checks
    when called on its own. Same bits as the unchecked classes."""
    heads = model.heads
    ctx = torch.randn(2, heads.trunk[0].in_features)
    with pytest.raises(ValueError, match="outside"):
        heads.shape_bits(ctx, "image", [(5, 3, 3), (4, 4, 7)])
    head = heads.shape["image"]
    with pytest.raises(ValueError, match="outside"):
        head.classes(torch.tensor([[5, 3, 3], [4, 4, 7]]))
    shapes = [(5, 3, 3), (40, 30, 1)]
    ref = head.bits(heads.trunk(ctx), torch.tensor(shapes))
    torch.testing.assert_close(heads.shape_bits(ctx, "image", shapes), ref)
    assert head.bins[0]._edges(torch.device("cpu")) is head.bins[0]._edges(torch.device("cpu"))
