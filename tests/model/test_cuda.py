"""The model core on CUDA (skipped without it): same results as the step form, bf16 autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blocklm.model.blocklm import BlockLM
from blocklm.model.config import SampleConfig
from blocklm.model.presets import tiny

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_blocklm_on_cuda(tokenizer_path):
    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer_path)).cuda()
    img = np.random.default_rng(0).integers(0, 256, (6, 5, 3), dtype=np.uint8)
    r = model.run_block("image", [img])
    assert r.state.is_cuda and torch.isfinite(r.loss.bits).all()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        r2 = model.run_block("text", ["Now is the winter", "of"], None)
        (r2.loss.bits.sum() + r2.loss.mode_bits.sum() + r2.loss.shape_bits.sum()).backward()
    assert r2.state.dtype == torch.float32 and torch.isfinite(r2.loss.bits).all()
    g = torch.Generator(device="cuda").manual_seed(0)
    out, st = model.generate_block("audio", [(9, 2)], r.state, SampleConfig(top_k=8), g)
    assert out[0].shape == (9, 2) and st.is_cuda
    mode, _ = model.predict_next(st, SampleConfig(), g)[0]
    assert mode in model.modes


def test_block_equals_steps_on_cuda():
    from blocklm.model.config import AttentionConfig, DecoderConfig, StackConfig
    from blocklm.model.decoder import Decoder

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(d_model=16, d_core=8, d_ff=32, layers=2,
                                attention=AttentionConfig(heads=2, head_dim=4, banks=3, chunk=4),
                                stack=StackConfig(depth=6, width=4, hidden=8))).cuda()
    x = torch.randn(2, 9, 16, device="cuda")
    s0 = dec.initial_state(2, "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    h, s1 = dec(x, s0)
    s, hs = s0, []
    for t in range(9):
        ht, s = dec.step(x[:, t], s)
        hs.append(ht)
    torch.testing.assert_close(h, torch.stack(hs, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s1, s, atol=1e-5, rtol=1e-5)


def test_decoder_uses_the_triton_kernel_and_matches_the_step_form():
    from blocklm.model.banked_triton import triton_supports
    from blocklm.model.config import AttentionConfig, DecoderConfig, StackConfig
    from blocklm.model.decoder import Decoder

    torch.manual_seed(0)
    dec = Decoder(DecoderConfig(d_model=64, d_core=32, d_ff=64, layers=2,
                                attention=AttentionConfig(heads=2, head_dim=16, banks=3, chunk=16),
                                stack=StackConfig(enabled=False))).cuda()
    x = torch.randn(2, 37, 64, device="cuda")
    q = torch.empty(2, 2, 37, 16, device="cuda")
    if not triton_supports(q, q, 16):
        pytest.skip("triton not importable here")
    s0 = dec.initial_state(2, "cuda")
    h, s1 = dec(x, s0)  # chunked: the Triton kernels (bf16 operands)
    s, hs = s0, []
    for t in range(37):
        ht, s = dec.step(x[:, t], s)  # the PyTorch step form
        hs.append(ht)
    torch.testing.assert_close(h, torch.stack(hs, 1), atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(s1, s, atol=3e-2, rtol=3e-2)
    h.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in dec.parameters() if p.requires_grad and p.grad is not None)


def test_compiled_stack_matches_the_eager_step_loop_on_cuda():
    """The stack's GPU path (torch.compile, Inductor) against the eager step loop: fp32 values
    and gradients, then under bf16 autocast (the training setting) within bf16 tolerance."""
    from blocklm.model.config import StackConfig
    from blocklm.model.stack import ProcessingStack
    from blocklm.model.stack_block import UNROLL, stack_block

    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    st = ProcessingStack(StackConfig(depth=32, width=16, hidden=32, max_steps=2), 48).cuda()
    B, T = 5, 3 * UNROLL + 3
    x = torch.randn(B, T, 48, device="cuda")
    V, s = torch.randn(B, 32, 16, device="cuda"), torch.rand(B, 32, device="cuda") * 0.3
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    mask[2, 11:] = False

    def run(backend, autocast=False):
        xs = [t.clone().requires_grad_(True) for t in (x, V, s)]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            if backend == "steps":
                ys, V2, s2 = [], xs[1], xs[2]
                for t in range(T):
                    y, V2, s2, _ = st.step(xs[0][:, t], V2, s2, mask[:, t])
                    ys.append(y)
                y = torch.stack(ys, 1)
            else:
                y, V2, s2 = stack_block(st, xs[0], xs[1], xs[2], mask, backend=backend)
        loss = (y.float() ** 2).sum() + (V2 * 0.1).sum() + s2.sum()
        return [y.float(), V2, s2] + list(torch.autograd.grad(loss, xs + list(st.parameters())))

    for a, b in zip(run("inductor"), run("steps")):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    for a, b in zip(run("inductor", True), run("steps", True)):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
