"""run_block reads the incoming state through one split (decoder parts, summary, history)."""

from __future__ import annotations

import torch


def _consumers(out: torch.Tensor, leaf: torch.Tensor) -> list[str]:
    """Names of the autograd nodes of ``out``'s graph that read ``leaf`` directly."""
    found, seen, todo = [], set(), [out.grad_fn]
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        for f, _ in n.next_functions:
            if f is not None and getattr(f, "variable", None) is leaf:
                found.append(type(n).__name__)
            todo.append(f)
    return found


def test_run_block_reads_the_state_through_one_split(model):
    """A slice per consumer (decoder part, history, the heads' summary and history) filled a
    zero gradient of the whole state each in backward and added them (the state is ~1.2M
    floats per example in `small`): one split's backward is one concatenation. Same values as
    the separate slices (the state after the block ends with the updated history)."""
    torch.manual_seed(0)
    state = (model.initial_state(2) + 0.01 * torch.rand(2, model.state_size)).requires_grad_()
    res = model.run_block("text", ["To be, or not", "Ay me"], state, logits=False)
    loss = res.loss.bits.sum() + res.loss.mode_bits.sum() + res.loss.shape_bits.sum()
    assert _consumers(loss + res.state.sum(), state) == ["SplitWithSizesBackward0"]
    M = len(model.supports)
    i = list(model.supports).index("text")
    hist = state[:, -2 * M:].detach()
    assert torch.equal(res.state[:, -2 * M:-M], hist[:, :M] + torch.eye(M)[i])
    assert torch.equal(res.state[:, -M:], torch.eye(M)[i].expand(2, M))
