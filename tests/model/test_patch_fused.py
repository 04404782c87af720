"""The image/audio element head's loss through model/patch_fused.py: the function the eager
path and the compiled path share equals the head's logits + cross-entropy (values and
gradients), through the checkpointed slices, padded rows and bf16 autocast; the aot_eager
compile of it on the CPU and Inductor on CUDA agree with it; one compiled graph serves every
slice and batch shape."""

from __future__ import annotations

import math

import pytest
import torch

from blocklm.model import patch as patch_mod
from blocklm.model.audio import AudioSupport
from blocklm.model.batch import BlockBatch
from blocklm.model.config import AudioConfig, ImageConfig
from blocklm.model.image import ImageSupport


def _support(loss_chunk=4, device="cpu", d=32):
    torch.manual_seed(0)
    return ImageSupport(ImageConfig(patch=2, head_width=16, loss_chunk=loss_chunk), d).to(device)


def _batch(sup, B, T, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    E = sup.elements_per_step
    targets = torch.randint(0, 256, (B, T, E), generator=g)
    mask = torch.rand(B, T, E, generator=g) > 0.3
    mask[-1, T // 2:] = False  # a shorter block
    z = torch.zeros(B, T, dtype=torch.bool)
    b = BlockBatch(sup.name, [(2, 2, 3)] * B, targets, z, torch.zeros(B, T, 2),
                   torch.zeros(B, sup.cond_dims), targets, mask, ~z, torch.ones(B))
    return b.to(device)


def _reference(sup, h, batch):
    """bits per example from the module's own logits (autocast casts) and cross-entropy."""
    logits = sup.head.logits(h, batch.targets)  # [B,T,E,V]
    nll = torch.nn.functional.cross_entropy(logits.float().flatten(0, -2),
                                            batch.targets.flatten(), reduction="none")
    return (nll.view(batch.targets.shape) * batch.mask).flatten(1).sum(1) / math.log(2.0)


def _run(sup, h, batch, form, autocast=False, fn=None):
    sup.head_form = form
    for p in sup.parameters():
        p.grad = None
    h.grad = None
    with torch.autocast(h.device.type, dtype=torch.bfloat16, enabled=autocast):
        bits = fn(sup, h, batch) if fn else sup.bits(h, batch)[0]
    bits.sum().backward()
    return [bits.detach()] + [h.grad.clone()] + [p.grad.clone() for p in sup.head.parameters()]


@pytest.mark.parametrize("T", [3, 10])  # one slice; three checkpointed slices of 4 steps
def test_slices_equal_the_heads_logits_and_cross_entropy(T):
    sup = _support()
    batch = _batch(sup, 3, T)
    h = torch.randn(3, T, 32, requires_grad=True)
    ref = _run(sup, h, batch, "eager", fn=_reference)
    got = _run(sup, h, batch, "eager")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


def test_padded_rows_cost_nothing(monkeypatch):
    """Rows padded to the row grid (CUDA) have target 0 and no mask: same bits and gradients."""
    sup = _support(loss_chunk=256)
    batch = _batch(sup, 3, 5)
    h = torch.randn(3, 5, 32, requires_grad=True)
    ref = _run(sup, h, batch, "eager")
    monkeypatch.setattr(patch_mod, "grid_rows", lambda n, like: n + 7)
    got = _run(sup, h, batch, "eager")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_no_slice_reaches_2_31_logits_on_the_row_grid(monkeypatch):
    """The small preset's largest audio batch of gpu_mixed4 (1,008 clips x 65 steps, 128
    elements a step) was one slice of 65,536 grid rows: 2**31 logits, past int32 indexing, so
    Inductor compiled the graph again inside the timed window (~1 s, GPU_NOTES P103-P108). Every
    slice now stays under the limit on the CUDA row grid; on the CPU (no grid) it is one slice."""
    from blocklm.model.decoder import token_rows

    sup = AudioSupport(AudioConfig(frame=64, max_channels=2, head_width=16), 8)
    B, T, E = 1008, 65, sup.elements_per_step
    assert E == 128
    seen = []

    def record(h, targets, mask):  # the slice's shape, not its arithmetic
        seen.append(h.shape[1])
        return h.new_zeros(h.shape[0])

    monkeypatch.setattr(sup, "_slice_bits", record)
    z = torch.zeros(1, 1, E, dtype=torch.long).expand(B, T, E)  # views: nothing allocated
    batch = BlockBatch(sup.name, [(T * 64, 2)] * B, z, torch.zeros(B, T, dtype=torch.bool),
                       torch.zeros(B, T, 1), torch.zeros(B, sup.cond_dims), z, z.bool(),
                       torch.ones(B, T, dtype=torch.bool), torch.ones(B))
    h = torch.zeros(1, 1, 8).expand(B, T, 8)
    sup.bits(h, batch)
    assert seen == [T]  # CPU: no grid rows, 65,520 x 128 x 256 < 2**31
    seen.clear()
    monkeypatch.setattr(patch_mod, "grid_rows", lambda n, like: token_rows(n))  # as on CUDA
    sup.bits(h, batch)
    assert sum(seen) == T and len(seen) == 2
    for t in seen:
        assert token_rows(B * t) * E * 256 <= patch_mod.INDEX_LIMIT < 2**31
    assert token_rows(B * T) * E * 256 == 2**31  # the one slice it was


def test_slices_cut_by_the_index_limit_give_the_same_bits(monkeypatch):
    """Slices shortened for the index limit are ordinary slices: bits and gradients as one."""
    sup = _support(loss_chunk=256)
    batch = _batch(sup, 3, 7)
    h = torch.randn(3, 7, 32, requires_grad=True)
    ref = _run(sup, h, batch, "eager")
    per_step = 3 * sup.elements_per_step * 256
    monkeypatch.setattr(patch_mod, "INDEX_LIMIT", 2 * per_step)  # 2 steps a slice: 2+2+2+1
    assert sup.slice_steps(3, 7, h) == 2
    got = _run(sup, h, batch, "eager")
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_explicit_casts_match_autocast():
    """Under bf16 autocast the function casts explicitly (what Inductor compiles): the same
    values as the module's logits under autocast, gradients to bf16 rounding."""
    sup = _support()
    batch = _batch(sup, 2, 9)
    h = torch.randn(2, 9, 32, requires_grad=True)
    ref = _run(sup, h, batch, "eager", autocast=True, fn=_reference)
    got = _run(sup, h, batch, "eager", autocast=True)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))


def test_compiled_slices_equal_eager_and_share_one_graph():
    """aot_eager (the compile without code generation) through the checkpointed slices, for
    batches of other shapes: the same values and gradients, no graph breaks, one graph per
    mode (E) rather than one per shape."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    sup = _support()
    for B, T in ((3, 10), (5, 7), (2, 13)):
        batch = _batch(sup, B, T, seed=B)
        h = torch.randn(B, T, 32, requires_grad=True)
        ref = _run(sup, h, batch, "eager")
        got = _run(sup, h, batch, "aot_eager")
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])


def test_compile_head_is_on_by_default_and_only_on_cuda():
    """``compile_head`` (default on) compiles on CUDA where the fused kernels do not run (here:
    ``fused_head`` off; on the H200 they are the default, P153); a CPU run stays eager."""
    img = ImageSupport(ImageConfig(), 32)
    aud = AudioSupport(AudioConfig(), 32)
    assert img.compile_head and aud.compile_head
    assert img._form(torch.empty(0)) == "eager"
    assert ImageSupport(ImageConfig(compile_head=False), 32)._form(torch.empty(0)) == "eager"
    if torch.cuda.is_available():
        cuda = torch.empty(0, device="cuda")
        assert ImageSupport(ImageConfig(fused_head=False), 32)._form(cuda) == "inductor"
        assert ImageSupport(ImageConfig(fused_head=False, compile_head=False), 32)._form(
            cuda) == "eager"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Inductor + Triton)")
def test_inductor_head_equals_eager_on_cuda():
    """Inductor's kernels against the eager function under the same bf16 autocast, both
    against fp32: errors of the same size."""
    sup = _support(loss_chunk=64, device="cuda", d=64)
    batch = _batch(sup, 6, 150, device="cuda")
    h = torch.randn(6, 150, 64, device="cuda", requires_grad=True)
    exact = _run(sup, h, batch, "eager")
    ref = _run(sup, h, batch, "eager", autocast=True)
    got = _run(sup, h, batch, "inductor", autocast=True)
    assert_as_close_to_fp32(got, ref, exact)


def assert_as_close_to_fp32(got, ref, exact):
    """Each of ``got``'s bits and gradients is about as far from the fp32 ``exact`` as the
    eager bf16 path's ``ref`` (within 1.5x, plus 3e-3 of the largest value)."""
    for a, b, c in zip(got, ref, exact):
        scale = c.abs().max()
        err_fused, err_plain = (a - c).abs().max() / scale, (b - c).abs().max() / scale
        assert err_fused <= 1.5 * err_plain + 3e-3, (err_fused, err_plain)


def test_warm_head_compiles_ahead_without_touching_gradients():
    """warm_head runs one small slice through the compiled form (forward and backward for
    training, no-grad for evaluation): the graphs exist before the first batch, and no
    parameter gradient is written; in the eager form it does nothing."""
    from torch._dynamo.utils import counters

    sup = _support()
    counters.clear()
    sup.warm_head("cpu", autocast=False)  # eager on the CPU: nothing to compile
    assert not counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    sup.head_form = "aot_eager"
    sup.warm_head("cpu", autocast=False)
    assert counters["stats"]["unique_graphs"] == 1
    sup.warm_head("cpu", autocast=False, grad=False)
    assert counters["stats"]["unique_graphs"] == 2  # the no-grad graph of evaluation
    assert all(p.grad is None for p in sup.parameters())
    batch = _batch(sup, 3, 10)  # a training batch of another shape: no new graph
    h = torch.randn(3, 10, 32, requires_grad=True)
    _run(sup, h, batch, "aot_eager")
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_warm_head_compiles_the_graph_bf16_training_uses():
    """Under bf16 autocast the decoder's stream, so the head's h, is bf16: warm_head compiles
    for that dtype. It compiled for fp32 h, a graph training never used: the first image and
    audio batches compiled theirs again (GPU_NOTES P72)."""
    from torch._dynamo.utils import counters

    sup = _support()
    torch._dynamo.reset()
    counters.clear()
    sup.head_form = "aot_eager"
    sup.warm_head("cpu", autocast=True)
    assert counters["stats"]["unique_graphs"] == 1
    batch = _batch(sup, 3, 10)
    h = torch.randn(3, 10, 32).to(torch.bfloat16).requires_grad_()
    _run(sup, h, batch, "aot_eager", autocast=True)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_a_failing_compile_names_the_mode_and_the_setting(monkeypatch):
    """A machine whose compiler fails stops when the runners are built, with the setting that
    runs the head uncompiled, not mid-window with the compiler's traceback alone."""
    sup = _support()
    sup.head_form = "aot_eager"

    def broken(form, lp):
        def fn(*a):
            raise OSError("no C compiler")
        return fn
    monkeypatch.setattr(patch_mod, "slice_bits_fn", broken)
    with pytest.raises(RuntimeError, match=r"image head.*model\.modes\.image\.compile_head=false"):
        sup.warm_head("cpu", autocast=False)


def test_every_support_can_be_warmed():
    """The trainer's runners warm every support's loss on CUDA (``warm_head``); a support that
    compiles nothing (text) inherits the no-op and leaves its parameters alone."""
    from torch._dynamo.utils import counters

    from blocklm.model.config import TextConfig
    from blocklm.model.text import TextSupport

    sup = TextSupport(TextConfig(tokenizer_path=None, vocab_size=50), 32)
    counters.clear()
    sup.warm_head("cpu", autocast=False)
    sup.warm_head("cpu", autocast=False, grad=False)
    assert not counters["stats"]["unique_graphs"]
    assert all(p.grad is None for p in sup.parameters())
