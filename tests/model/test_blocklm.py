"""BlockLM end to end: gradients, losses in bits by hand, samples respect shapes, plug-in modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from blocklm.model.audio import AudioSupport, mu_law_decode, mu_law_encode
from blocklm.model.blocklm import BlockLM
from blocklm.model.config import SampleConfig, TextConfig
from blocklm.model.presets import tiny
from blocklm.model.support import default_registry
from blocklm.model.text import TextSupport

RNG = np.random.default_rng(0)
IMG = [RNG.integers(0, 256, (5, 3, 3), dtype=np.uint8), RNG.integers(0, 256, (2, 4, 1),
                                                                      dtype=np.uint8)]
AUD = [(RNG.standard_normal((9, 2)) * 3000).astype(np.int16),
       (RNG.standard_normal((5, 1)) * 0.1).astype(np.float32)]


def test_gradients_reach_every_parameter(model):
    r1 = model.run_block("text", ["To be, or not", "Ay"])
    r2 = model.run_block("image", IMG, r1.state)
    r3 = model.run_block("audio", AUD, r2.state)
    total = sum((r.loss.bits + r.loss.mode_bits + r.loss.shape_bits).sum() for r in (r1, r2, r3))
    (total + model.end_bits(r3.state).sum()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_text_bits_match_hand_computation(model):
    sup = model.support("text")
    text = "Good morrow"
    r = model.run_block("text", [text])
    ids = sup.tokenizer.encode(text, out_type=int)
    logp = torch.log_softmax(sup.unembed(r.outputs[0, :len(ids)]), -1)
    hand = -sum(float(logp[t, i]) for t, i in enumerate(ids)) / math.log(2)
    assert r.loss.elements.tolist() == [len(text)]
    assert abs(float(r.loss.bits[0]) - hand) < 1e-3
    assert abs(float(r.loss.bits_per_element[0]) - hand / len(text)) < 1e-4


def test_image_bits_match_hand_computation(model):
    sup = model.support("image")
    img = IMG[1]  # 2x4x1, patch 2: two patches, 4 real sub-pixels each
    r = model.run_block("image", [img])
    batch = sup.target([img])
    logp = torch.log_softmax(sup.distribution(r.outputs, batch), -1)  # [1,T,E,256]
    hand = 0.0
    for p in range(2):
        for py in range(2):
            for px in range(2):
                e = (py * 2 + px) * 4  # channel 0 of pixel (py, px) in the patch
                hand -= float(logp[0, p, e, img[py, p * 2 + px, 0]])
    assert r.loss.elements.tolist() == [8.0]
    assert abs(float(r.loss.bits[0]) - hand / math.log(2)) < 1e-3


def test_uniform_distribution_costs_8_bits_per_subpixel(model):
    sup = model.support("image")
    batch = sup.target(IMG)
    logits = torch.zeros(*batch.targets.shape, 256)
    bits, elements = sup.loss(logits, batch)
    torch.testing.assert_close(bits / elements, torch.full((2,), 8.0))


def test_padding_never_counts(model):
    r_alone = model.run_block("audio", [AUD[1]])
    r_batch = model.run_block("audio", [AUD[1], AUD[0]])
    torch.testing.assert_close(r_alone.loss.bits[0], r_batch.loss.bits[0], atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(r_alone.state[0], r_batch.state[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode,shapes", [
    ("text", [(7,), (0,), (3,)]),
    ("image", [(3, 5, 4), (2, 2, 1), (1, 3, 3)]),
    ("audio", [(9, 2), (3, 1), (0, 1)]),
])
def test_samples_respect_the_shape(model, mode, shapes):
    g = torch.Generator().manual_seed(0)
    out, state = model.generate_block(mode, shapes, None, SampleConfig(top_p=0.9), g)
    sup = model.support(mode)
    assert [sup.shape_of(c) for c in out] == shapes
    assert state.shape == (3, model.state_size)
    if mode == "image":
        assert all(c.dtype == np.uint8 for c in out)
    if mode == "audio":
        assert all(c.dtype == np.int16 for c in out)


def test_generation_state_equals_running_the_sample(model):
    g = torch.Generator().manual_seed(1)
    out, state = model.generate_block("image", [(3, 3, 3)], None, SampleConfig(), g)
    r = model.run_block("image", out)
    torch.testing.assert_close(r.state, state, atol=1e-5, rtol=1e-5)


def test_causality_within_patches(model):
    sup = model.support("image")
    img = IMG[0].copy()
    batch = sup.target([img])
    h, _ = model.decoder(sup.embed(batch), model.initial_state(1), batch.steps)
    logits = sup.distribution(h, batch)
    img2 = img.copy()
    img2[2, 1, 1] ^= 0xFF  # patch (1, 0), pixel (0, 1), channel 1 -> element 5 of step 2
    batch2 = sup.target([img2])
    h2, _ = model.decoder(sup.embed(batch2), model.initial_state(1), batch2.steps)
    logits2 = sup.distribution(h2, batch2)
    assert torch.equal(logits2[0, :2], logits[0, :2])
    assert torch.equal(logits2[0, 2, :6], logits[0, 2, :6])
    assert not torch.allclose(logits2[0, 2, 6:], logits[0, 2, 6:])


def test_steps_and_positions(model):
    assert model.steps("image", (480, 320, 3)) == 240 * 160 + 1  # tiny patch is 2
    assert model.steps("audio", (17, 1)) == 5 + 1
    assert model.steps("text", (40,)) == 10 + 1
    pos = model.support("image").positions_of((4, 6, 3), 7)
    assert pos[:, 0].tolist() == [0, 0, 0, 2, 2, 2, 4] and pos[:, 1].tolist() == [0, 2, 4] * 2 + [0]


def test_mu_law_round_trip():
    x = np.linspace(-1, 1, 1001)
    q = mu_law_encode(x)
    assert q.min() == 0 and q.max() == 255
    assert np.abs(mu_law_decode(q) - x).max() < 0.025  # coarsest step near +-1
    assert np.array_equal(mu_law_encode(mu_law_decode(np.arange(256))), np.arange(256))


def test_image_patches_round_trip(model):
    sup = model.support("image")
    for img in IMG:
        vals, _ = sup.encode(img)
        assert np.array_equal(sup.assemble(vals, img.shape), img)


def test_a_new_mode_plugs_in_by_registering(tokenizer_path):
    reg = default_registry()
    reg.register("code", TextSupport)
    cfg = tiny(tokenizer_path=tokenizer_path)
    cfg.modes["code"] = TextConfig(tokenizer_path=tokenizer_path)
    m = BlockLM(cfg, registry=reg)
    assert m.modes == ["text", "image", "audio", "code", "end"]
    r = m.run_block("code", ["x = 1"])
    assert r.loss.bits.shape == (1,) and r.mode_logits.shape == (1, 5)
    with pytest.raises(ValueError):
        reg.register("audio", AudioSupport)


def test_predict_next_gives_registered_modes_and_valid_shapes(model):
    g = torch.Generator().manual_seed(2)
    state = model.run_block("text", ["abc", "de"]).state
    for mode, shape in model.predict_next(state, SampleConfig(), g) + model.predict_next(state):
        assert mode in model.modes
        if mode != "end":
            sup = model.support(mode)
            assert len(shape) == len(sup.shape_dims) and all(d >= 0 for d in shape)


def test_bf16_autocast_runs(model):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        r = model.run_block("text", ["Hark"])
    assert r.state.dtype == torch.float32 and torch.isfinite(r.loss.bits).all()


def test_small_preset_is_about_125m_parameters():
    with torch.device("meta"):
        m = BlockLM(presets_small())
    n = sum(p.numel() for p in m.parameters())
    assert 110e6 < n < 140e6


def presets_small():
    from blocklm.model.presets import small

    return small(tokenizer_path=None, vocab_size=32000)


def test_sliced_loss_equals_whole_loss(model):
    sup = model.support("image")
    img = RNG.integers(0, 256, (6, 6, 3), dtype=np.uint8)  # 9 patches + summary = 10 steps
    r = model.run_block("image", [img])
    g_whole = torch.autograd.grad(r.loss.bits.sum(), sup.head.val)[0]
    sup.loss_chunk = 3
    r2 = model.run_block("image", [img])
    g_sliced = torch.autograd.grad(r2.loss.bits.sum(), sup.head.val)[0]
    torch.testing.assert_close(r2.loss.bits, r.loss.bits, atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(g_sliced, g_whole, atol=1e-5, rtol=1e-5)


def test_content_steps_are_the_steps_run(model):
    for mode, content in (("text", "Now is the winter of our discontent"), ("image", IMG[0]),
                          ("audio", AUD[0])):
        r = model.run_block(mode, [content])
        assert model.content_steps(mode, content) == r.outputs.shape[1]
    assert model.content_steps("image", IMG[0]) == model.steps("image", IMG[0].shape)


def test_bad_contents_are_named():
    sup_cfg = tiny(tokenizer_path=None, vocab_size=300)
    m = BlockLM(sup_cfg)
    with pytest.raises(ValueError, match="uint8"):
        m.run_block("image", [np.zeros((2, 2, 3), np.float32)])
    with pytest.raises(ValueError, match="channels"):
        m.run_block("audio", [np.zeros((8, 3), np.int16)])
    with pytest.raises(ValueError, match="str"):
        m.support("text").shape_of(b"bytes")
    with pytest.raises(KeyError, match="video"):
        m.run_block("video", [b""])


def test_a_480x320_rgb_image_is_not_460800_steps():
    from blocklm.model.config import ImageConfig
    from blocklm.model.image import ImageSupport

    assert ImageSupport(ImageConfig(patch=8), 16).steps((480, 320, 3)) == 60 * 40 + 1


def test_state_carries_the_block_history_the_heads_read(model):
    M = len(model.supports)
    names = list(model.supports)
    s0 = model.initial_state(2)
    r1 = model.run_block("audio", [np.zeros((40, 1), np.int16)] * 2, s0)
    r2 = model.run_block("text", ["seven", "one"], r1.state)
    hist = r2.state[:, -2 * M:]
    counts, last = hist[:, :M], hist[:, M:]
    assert counts[:, names.index("audio")].tolist() == [1.0, 1.0]
    assert counts[:, names.index("text")].tolist() == [1.0, 1.0]
    assert last[:, names.index("text")].tolist() == [1.0, 1.0] and last.sum().item() == 2.0
    ctx = model.head_input(r2.state)
    from blocklm.model.blocklm import COUNT_BINS
    assert ctx.shape == (2, model.cfg.decoder.d_model + (COUNT_BINS + 1) * M)
    # the heads see the history: changing only the counts changes the next-mode prediction
    bumped = r2.state.clone()
    bumped[:, -2 * M + names.index("text")] += 3.0
    assert not torch.allclose(model.heads.mode_logits(model.head_input(bumped)),
                              model.heads.mode_logits(ctx))
    # generation keeps the same bookkeeping
    _, g = model.generate_block("text", [(3,), (3,)], r1.state,
                                generator=torch.Generator().manual_seed(0))
    assert torch.equal(g[:, -2 * M:], hist)
