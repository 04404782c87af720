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
    assert {type(r.grad_fn).__name__ for r in rows} == {"_UnbindRowsBackward"}
    assert len({r.grad_fn for r in rows}) == 1  # one node for the whole batch
    # same values and gradients as the batch state itself
    runners.finish([r.state for r in res])
    (runners.window.objective()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def _casts_of(loss: torch.Tensor, weight: torch.Tensor) -> int:
    """How many backward nodes cast ``weight`` (ToCopyBackward feeding its AccumulateGrad)."""
    seen, todo, n = set(), [loss.grad_fn], 0
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for f, _ in node.next_functions:
            if type(node).__name__ == "ToCopyBackward0" and \
                    getattr(f, "variable", None) is weight:
                n += 1
            todo.append(f)
    return n


def test_autocast_casts_each_weight_once_per_window(tokenizer):
    """One autocast context per window: the bf16 copy of a weight is made once per optimizer
    step and shared by the window's batches (a context per batch cast every weight again per
    batch: one cast kernel and one ToCopyBackward node per weight and batch). The context is
    closed with the window, so no copy outlives an optimizer step."""
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    runners = ModelRunners(model, torch.device("cpu"), autocast=True)  # CPU autocast, bf16
    texts = [["To be, or not", "Ay"], ["Good morrow", "What, ho!", "Peace"]]
    for t in texts:
        reqs = [SimpleNamespace(context=None, shape=(len(x),), inputs=x, block=0) for x in t]
        runners.run("text", SimpleNamespace(requests=reqs, padded_cost=8))
    assert torch.is_autocast_enabled("cpu")
    objective = runners.window.objective()
    weight = model.decoder.layers[0].down.weight
    assert _casts_of(objective, weight) == 1
    runners.close_autocast()
    assert not torch.is_autocast_enabled("cpu")
    objective.backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()
    runners.next_window()
    assert runners._ac is None
