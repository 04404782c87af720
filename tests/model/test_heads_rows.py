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
