"""The runner hands each example its row of the batch's new state without O(B^2) backward work."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from blocklm.model.blocklm import BlockLM
from blocklm.model.presets import tiny
from blocklm.tools.train.runner import ModelRunners


def test_context_rows_come_from_one_unbind(tokenizer):
    """Indexing ``new[i]`` per example made B select nodes whose backward each filled a zero
    [B, state_size] tensor (on the GPU that was half the step's kernel time); one ``unbind``
    gives the same rows with one backward node that stacks the row gradients once."""
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    runners = ModelRunners(model, torch.device("cpu"))
    rng = np.random.default_rng(0)
    reqs = [SimpleNamespace(context=None, shape=(4, 6, 3),
                            inputs=rng.integers(0, 256, (4, 6, 3), dtype=np.uint8))
            for _ in range(3)]
    res = runners.run("image", SimpleNamespace(requests=reqs, padded_cost=3 * 12))
    rows = [r.state.state for r in res]
    assert {type(r.grad_fn).__name__ for r in rows} == {"UnbindBackward0"}
    assert len({r.grad_fn for r in rows}) == 1  # one node for the whole batch
    # same values and gradients as the batch state itself
    runners.finish([r.state for r in res])
    (runners.window.objective()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
