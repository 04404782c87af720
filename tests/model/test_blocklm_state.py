"""run_block reads the incoming state through one split (decoder parts, summary, history)."""

from __future__ import annotations

import torch


def test_run_block_reads_the_state_through_one_split(model, grad_consumers):
    """A slice per consumer (decoder part, history, the heads' summary and history) filled a
    zero gradient of the whole state each in backward and added them (the state is ~1.2M
    floats per example in `small`): one split's backward is one concatenation. Same values as
    the separate slices (the state after the block ends with the updated history)."""
    torch.manual_seed(0)
    state = (model.initial_state(2) + 0.01 * torch.rand(2, model.state_size)).requires_grad_()
    res = model.run_block("text", ["To be, or not", "Ay me"], state, logits=False)
    loss = res.loss.bits.sum() + res.loss.mode_bits.sum() + res.loss.shape_bits.sum()
    assert grad_consumers(loss + res.state.sum(), state) == ["SplitWithSizesBackward0"]
    M = len(model.supports)
    i = list(model.supports).index("text")
    hist = state[:, -2 * M:].detach()
    assert torch.equal(res.state[:, -2 * M:-M], hist[:, :M] + torch.eye(M)[i])
    assert torch.equal(res.state[:, -M:], torch.eye(M)[i].expand(2, M))
