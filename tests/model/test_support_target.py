"""The batched ``ModeSupport.target`` equals the per-example construction it replaced."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blocklm.model.batch import BlockBatch
from blocklm.model.support import ModeSupport

RNG = np.random.default_rng(3)


def per_example_target(sup: ModeSupport, contents: list) -> BlockBatch:
    """The earlier implementation: one slice write per example and field (the reference)."""
    shapes = [sup.shape_of(c) for c in contents]
    enc = [sup.encode(c) for c in contents]
    B, E = len(contents), sup.elements_per_step
    T = max(v.shape[0] for v, _ in enc) + 1
    inputs = torch.zeros(B, T, E, dtype=torch.long)
    targets = torch.zeros(B, T, E, dtype=torch.long)
    mask = torch.zeros(B, T, E, dtype=torch.bool)
    steps = torch.zeros(B, T, dtype=torch.bool)
    positions = torch.zeros(B, T, sup.position_dims)
    for i, ((v, m), shp) in enumerate(zip(enc, shapes)):
        n = v.shape[0]
        inputs[i, 1:n + 1], targets[i, :n], mask[i, :n] = v, v, m
        steps[i, :n + 1] = True
        positions[i, :n + 1] = sup.positions_of(shp, n + 1)
    start = torch.zeros(B, T, dtype=torch.bool)
    start[:, 0] = True
    cond = torch.stack([sup.cond_of(s) for s in shapes]).view(B, sup.cond_dims)
    elements = torch.tensor([float(sup.elements_of(s)) for s in shapes])
    lengths = tuple(int(v.shape[0]) + 1 for v, _ in enc)  # the start step and n element steps
    return BlockBatch(sup.name, shapes, inputs, start, positions, cond, targets, mask, steps,
                      elements, lengths)


def same(a: BlockBatch, b: BlockBatch) -> None:
    for k, v in a.__dict__.items():
        w = b.__dict__[k]
        if isinstance(v, torch.Tensor):
            assert v.dtype == w.dtype and v.shape == w.shape, k
            assert torch.equal(v, w), k
        else:
            assert v == w, k


def test_batched_target_equals_per_example(model):
    texts = ["To be, or not to be", "", "Ay", "x" * 57, "Good morrow, cousin."]
    imgs = [RNG.integers(0, 256, s, dtype=np.uint8) for s in ((5, 3, 3), (2, 4, 1), (7, 9, 4))]
    auds = [(RNG.standard_normal((n, c)) * 3000).astype(np.int16) for n, c in ((9, 2), (5, 1),
                                                                               (40, 2))]
    for mode, contents in (("text", texts), ("image", imgs), ("audio", auds)):
        sup = model.support(mode)
        for sub in (contents, contents[:1], contents[::-1]):
            same(sup.target(sub), per_example_target(sup, sub))


def test_packed_batches_equal_the_per_block_encoding(model):
    """Image and audio write each block straight into the batch (``pack``) and make the masks
    from the shapes (``element_masks``): the same batch as encoding each block, on shapes that
    are and are not whole patches / frames, every channel count, int16, float, 1-D and
    ``(array, rate)`` audio, an empty clip."""
    P = model.support("image").P
    shapes = [(P, P, 1), (2 * P, 3 * P, 3), (2 * P + 1, P - 1, 4), (1, 5 * P + 3, 2),
              (P + 2, 2 * P, 3)]
    imgs = [RNG.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    imgs.append(RNG.integers(0, 256, (3 * P, P, 3), dtype=np.uint8)[::-1])  # not contiguous
    # equal shapes apart (one group, not a run of rows) and together
    imgs += [RNG.integers(0, 256, shapes[1], dtype=np.uint8) for _ in range(2)]
    imgs.insert(2, RNG.integers(0, 256, shapes[1], dtype=np.uint8))
    F = model.support("audio").cfg.frame
    auds = [(RNG.standard_normal((n, c)) * 9000).clip(-32768, 32767).astype(np.int16)
            for n, c in ((F, 1), (3 * F + 1, 2), (F - 1, 2), (0, 1))]
    auds += [np.array([-32768, 32767, 0, -1, 1], np.int16),  # the table's ends, 1-D
             (RNG.uniform(-1.2, 1.2, (2 * F + 3, 2)).astype(np.float32), 8000),
             RNG.uniform(-1, 1, (F + 2, 1))]
    for mode, contents in (("image", imgs), ("audio", auds)):
        sup = model.support(mode)
        ref = per_example_target(sup, contents)
        got = sup.target(contents)
        same(got, ref)
        for sub in [contents[i:i + 1] for i in range(len(contents))] + [contents[1:3]]:
            same(sup.target(sub), per_example_target(sup, sub))  # [1:3]: one run of equal shapes
        assert torch.equal(sup.element_masks(got.shapes, got.mask.shape[1]), ref.mask)


def test_int16_level_table_is_the_formula():
    from blocklm.model.audio import int16_levels, mu_law_encode

    every = np.arange(-32768, 32768).astype(np.int16)
    assert np.array_equal(int16_levels(every), mu_law_encode(every.astype(np.float64) / 32768.0))


def test_element_count_is_counted_on_the_host(model):
    """run_block reports the element count as a float from the shapes (the runner read it from
    the device tensor before: one GPU wait per batch); it equals the per-example tensor's sum."""
    imgs = [RNG.integers(0, 256, (5, 3, 3), dtype=np.uint8)]
    for mode, contents in (("text", ["To be, or not", "Ay"]), ("image", imgs)):
        loss = model.run_block(mode, contents).loss
        assert isinstance(loss.element_count, float)
        assert loss.element_count == float(loss.elements.sum()) > 0


def test_element_head_lookup_equals_advanced_indexing():
    """ElementHead reads its value rows with one embedding lookup: same logits and gradients
    as ``val[arange(E), values]`` (whose backward serialised duplicate rows on the GPU)."""
    from blocklm.model.patch import ElementHead

    torch.manual_seed(0)
    head = ElementHead(5, 16, 8)
    h, values = torch.randn(2, 3, 16), torch.randint(0, 256, (2, 3, 5))
    head.logits(h, values).square().sum().backward()
    got = head.val.grad.clone()
    head.val.grad = None
    ve = head.val[torch.arange(5), values]
    ref = head.out(head.ctx(h)[..., None, :] + head.pos + (ve.cumsum(-2) - ve))
    ref.square().sum().backward()
    torch.testing.assert_close(head.logits(h, values), ref, rtol=0, atol=0)
    torch.testing.assert_close(got, head.val.grad, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory)")
def test_packed_batches_on_cuda_equal_the_cpu_ones(model):
    """On a CUDA device the elements go through pinned memory without waiting and the masks are
    made there: the same batch as on the CPU."""
    imgs = [RNG.integers(0, 256, s, dtype=np.uint8)
            for s in ((9, 17, 3), (16, 8, 4), (5, 3, 1), (9, 17, 3))]
    auds = [(RNG.standard_normal((n, c)) * 3000).astype(np.int16) for n, c in ((99, 2), (5, 1))]
    for mode, contents in (("image", imgs), ("audio", auds)):
        sup = model.support(mode)
        for _ in range(3):  # pinned buffers are reused: later batches must not see old bytes
            got = sup.target(contents, "cuda")
            torch.cuda.synchronize()
            ref = sup.target(contents)
            for k, v in ref.__dict__.items():
                w = got.__dict__[k]
                if isinstance(v, torch.Tensor):
                    assert w.device.type == "cuda" and torch.equal(w.cpu(), v), k
            contents = contents[::-1]


def test_text_tokenized_ahead_gives_the_same_batch(model):
    """``prepare`` (the read-ahead thread's tokenization) changes nothing in the batch: texts
    all prepared, none, or some of them (the rest tokenized in one call there)."""
    from blocklm.model.text import Tokenized

    sup = model.support("text")
    texts = ["To be, or not to be", "", "Ay", "x" * 57, "Good morrow, cousin.", "é ü ß"]
    ref = sup.target(texts)
    ready = [sup.prepare(t) for t in texts]
    assert all(isinstance(r, Tokenized) and r.text == t for r, t in zip(ready, texts))
    assert sup.prepare(ready[0]) is ready[0]
    same(sup.target(ready), ref)
    same(sup.target([r if i % 2 else t for i, (r, t) in enumerate(zip(ready, texts))]), ref)
    assert sup.shape_of(ready[3]) == (57,)
    assert sup.content_steps(ready[4]) == sup.content_steps(texts[4])


def test_audio_levels_made_ahead_give_the_same_batch(model):
    """``prepare`` (the read-ahead thread's mu-law table lookup) changes nothing in the batch:
    int16, float, 1-D and ``(array, rate)`` clips, all prepared, none, or some of them; the
    shape, steps and per-block encoding of a prepared clip are the raw clip's."""
    from blocklm.model.audio import Levels

    sup = model.support("audio")
    F = sup.cfg.frame
    auds = [(RNG.standard_normal((n, c)) * 9000).clip(-32768, 32767).astype(np.int16)
            for n, c in ((F, 1), (3 * F + 1, 2), (F - 1, 2), (0, 1))]
    auds += [np.array([-32768, 32767, 0, -1, 1], np.int16),
             (RNG.uniform(-1.2, 1.2, (2 * F + 3, 2)).astype(np.float32), 8000),
             RNG.uniform(-1, 1, (F + 2, 1))]
    ref = sup.target(auds)
    ready = [sup.prepare(a) for a in auds]
    assert all(isinstance(r, Levels) and r.levels.dtype == np.uint8 for r in ready)
    assert sup.prepare(ready[1]) is ready[1]
    same(sup.target(ready), ref)
    same(sup.target([r if i % 2 else a for i, (r, a) in enumerate(zip(ready, auds))]), ref)
    for r, a in zip(ready, auds):
        assert sup.shape_of(r) == sup.shape_of(a)
        assert all(torch.equal(x, y) for x, y in zip(sup.encode(r), sup.encode(a)))
    with pytest.raises(ValueError, match="channels"):
        sup.prepare(np.zeros((4, 9), np.int16))  # more channels than the model has


@pytest.mark.parametrize("rate", [4.0, 3.7, 2.3, 1.0])
def test_a_texts_cost_shape_costs_its_exact_steps(model, rate):
    """``cost_shape``: the character count at which the cost model (``steps``) gives the text's
    own steps (tokens + 1), at any ``chars_per_token`` of 1 or more (float rounding included);
    a text's characters only estimate them. Images and audio cost exactly by their shapes."""
    import dataclasses

    from blocklm.model.text import TextSupport

    base = model.support("text")
    sup = TextSupport(dataclasses.replace(base.cfg, chars_per_token=rate), 8)
    texts = ["", "a", "To be, or not to be", "1234567890" * 7, "é ü ß Ω", "x" * 57,
             "Good morrow, cousin. " * 9]
    off = 0
    for t in texts:
        exact = sup.content_steps(t)
        got = sup.cost_shape(t)
        assert got is not None and sup.steps(got) == exact, (t, rate, got)
        assert sup.cost_shape(sup.prepare(t)) == got  # tokenized ahead: the same
        off += sup.steps(sup.shape_of(t)) != exact
    assert off > 0  # the characters' estimate misses some
    assert sup.steps_of([sup.prepare(t) for t in texts] + texts[:2]) == \
        [sup.content_steps(t) for t in texts + texts[:2]]
    half = TextSupport(dataclasses.replace(base.cfg, chars_per_token=0.5), 8)
    odd = [t for t in texts if (half.content_steps(t) - 1) % 2]  # 2 tokens a character: an
    assert odd and all(half.cost_shape(t) is None for t in odd)  # odd count has no length
    assert sup.cost_estimated
    for mode in ("image", "audio"):
        assert not model.support(mode).cost_estimated
        assert model.support(mode).cost_shape(np.zeros((4, 4, 3), np.uint8)) is None
