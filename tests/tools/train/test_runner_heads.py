"""The end-of-example head reads the state's tail (summary, history), not whole states."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from blocklm.model.blocklm import BlockLM
from blocklm.model.heads import END
from blocklm.model.presets import tiny
from blocklm.tools.train.runner import Context, ModelRunners


class OldFinish(ModelRunners):
    """The previous code path: whole states stacked, then ``end_bits`` of them."""

    @staticmethod
    def _keeps_state(batch):
        return True

    def finish(self, contexts):
        state = self._states(contexts)
        bits = self.model.end_bits(state)
        self.window.head_bits["next_mode"].append(bits.float())
        self.window.head_count["next_mode"] += len(contexts)


def _req(ctx, x, block=0, last=False):
    shape = (len(x),) if isinstance(x, str) else x.shape
    return SimpleNamespace(context=ctx, shape=tuple(shape), inputs=x, block=block, last=last)


def _window(runners: ModelRunners, restored: bool = False) -> torch.Tensor:
    """Three batches (text, image continuing some text examples, text), examples finished from
    several batches in a scrambled order; returns the objective."""
    rng = np.random.default_rng(1)
    a = runners.run("text", SimpleNamespace(requests=[_req(None, t) for t in
                                                       ["To be, or not", "Ay", "Good", "Peace"]],
                                            padded_cost=20))
    imgs = [rng.integers(0, 256, (4, 6, 3), dtype=np.uint8) for _ in range(2)]
    b = runners.run("image", SimpleNamespace(
        requests=[_req(a[1].state, imgs[0], 1, True), _req(a[3].state, imgs[1], 1)],
        padded_cost=24))
    c = runners.run("text", SimpleNamespace(requests=[_req(None, t, last=True)
                                                      for t in ["What, ho!", "No"]],
                                            padded_cost=10))
    # a batch of last pieces packs no state; one that is not all last keeps it
    assert (c[0].state.state is None) == (type(runners) is ModelRunners)
    assert b[0].state.state is not None
    done = [c[1].state, a[0].state, b[1].state, a[2].state, c[0].state, b[0].state]
    if restored:  # as a checkpoint restores them: state rows only
        done[2] = Context(done[2].state, done[2].window)
    runners.finish(done[:4])
    runners.finish(done[4:])
    return runners.window.objective()


@pytest.mark.parametrize("restored", [False, True])
def test_step_loss_and_gradients_match_the_whole_state_path(tokenizer, restored):
    """Same loss and parameter gradients as stacking whole states for the end head."""
    out = []
    for cls in (OldFinish, ModelRunners):
        torch.manual_seed(0)
        model = BlockLM(tiny(tokenizer_path=tokenizer))
        runners = cls(model, torch.device("cpu"))
        loss = _window(runners, restored)
        loss.backward()
        out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                    if p.grad is not None}))
    (l0, g0), (l1, g1) = out
    assert torch.allclose(l0, l1, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 20
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


class Widest(TorchDispatchMode):
    """The widest last dimension of any tensor an op makes."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor) and t.dim() == 2:
                self.width = max(self.width, t.shape[-1])
        return out


def test_finish_copies_no_whole_state(tokenizer):
    """Stacking whole [B, state_size] rows for the end head copied ~1.2M floats per example
    in `small` forward and filled as many zero gradients in backward (failed before: the
    widest tensor made was the state)."""
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    runners = ModelRunners(model, torch.device("cpu"))
    res = runners.run("text", SimpleNamespace(requests=[_req(None, t) for t in ["Ay", "Good"]],
                                              padded_cost=6))
    head = model.cfg.decoder.d_model + 2 * len(model.supports)
    assert res[0].state.head[0].shape == (2, head)
    w = Widest()
    with w:
        runners.finish([r.state for r in res])
        runners.window.head_bits["next_mode"][-1].sum().backward()
    assert w.width < model.state_size and w.width <= max(head, model.cfg.heads.hidden, 64)
    # the same values as the whole-state path
    state = torch.stack([r.state.state for r in res]).detach()
    ref = model.heads.mode_bits(model.head_input(state), [END] * 2)
    assert torch.allclose(runners.window.head_bits["next_mode"][-1].detach(), ref)


def test_first_blocks_start_from_empty_memories(tokenizer, monkeypatch):
    """A batch of first blocks (every text batch) starts from no state at all: no stack of B
    empty rows (a [B, state_size] copy per batch; failed before), and the attention kernels get
    no incoming memory (they neither read it nor write its gradient). Same loss and gradients
    as from explicit empty states."""
    from blocklm.model import attention, banked_triton
    from blocklm.tools.bench_train_ops import StandIn

    seen = []

    class Recording(StandIn):
        @staticmethod
        def forward(ctx, q, k, v, r, w, g, S0, z0, eps, C, R):
            seen.append(S0 is None and z0 is None)
            return StandIn.forward(ctx, q, k, v, r, w, g, S0, z0, eps, C, R)

    model = BlockLM(tiny(tokenizer_path=tokenizer))
    runners = ModelRunners(model, torch.device("cpu"))
    assert runners._states([None, None, None]) is None
    texts = ["To be, or not", "Ay", "Good morrow"]
    for patched in (False, True):  # the CPU path, then the kernels' path (stand-in kernels)
        if patched:
            monkeypatch.setattr(banked_triton, "BankedAttentionFn", Recording)
            monkeypatch.setattr(attention, "kernel_path", lambda q, v, chunk: True)
        out = []
        for state in (None, model.initial_state(3)):
            model.zero_grad()
            res = model.run_block("text", texts, state, logits=False)
            loss = res.loss.bits.sum() + res.loss.mode_bits.sum() + res.loss.shape_bits.sum() \
                + res.state.square().sum()
            loss.backward()
            out.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                        if p.grad is not None]))
        assert torch.allclose(out[0][0], out[1][0], rtol=1e-6)
        assert len(out[0][1]) == len(out[1][1]) > 10
        for a, b in zip(out[0][1], out[1][1]):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    n = len(model.decoder.layers)
    assert seen == [True] * n + [False] * n


def test_request_last_marks_each_examples_last_piece():
    """``Request.last`` is true exactly for the last piece of each example, as the runner
    sees it (before the dispatcher routes the result)."""
    from blocklm.formats import Block, Sample
    from blocklm.pipeline.dispatch import Dispatcher
    from blocklm.pipeline.dispatch_types import DispatchConfig, Result

    seen = []

    def runner(batch):
        seen.extend((r.key, r.block, r.last) for r in batch.requests)
        return [Result(state=None) for _ in batch.requests]

    def text(n):
        return Block("text", (n,), "utf8", b"x" * n)

    samples = [Sample("a", [text(3)]), Sample("b", [text(2), text(4), text(1)]),
               Sample("c", [text(5), text(2)])]
    d = Dispatcher({"text": runner}, None, DispatchConfig(prefetch=0), cost=lambda m, s: s[0],
                   prepare=lambda b: ((b.mode, b.shape, b.payload), b.payload))
    for _ in d.run(samples):
        pass
    last = {"a": 0, "b": 2, "c": 1}
    assert sorted(seen) == sorted((k, i, i == last[k]) for k, n in (("a", 1), ("b", 3), ("c", 2))
                                  for i in range(n))


def test_prepare_tokenizes_text_ahead_and_decodes_the_rest(tokenizer):
    """The dispatcher's ``prepare``: text blocks come back tokenized (the same batch as the
    decoded string), other modes decoded as they are."""
    from blocklm.formats.codecs import raw_image_block, text_block
    from blocklm.model.text import Tokenized

    model = BlockLM(tiny(tokenizer_path=tokenizer))
    runners = ModelRunners(model, torch.device("cpu"))
    img = np.random.default_rng(2).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    x, y = runners.prepare(text_block("To be, or not"))
    assert x is y and isinstance(x, Tokenized) and x.text == "To be, or not"
    sup = model.support("text")
    assert torch.equal(sup.target([x]).targets, sup.target(["To be, or not"]).targets)
    x, _ = runners.prepare(raw_image_block(img))
    assert np.array_equal(x, img)
