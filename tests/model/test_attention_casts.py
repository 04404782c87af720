"""The attention's projections widen only q and k: same values and gradients, fewer casts."""

from __future__ import annotations

import torch

from blocklm.model.attention import BankedAttention, feature_map, upcast
from blocklm.model.config import AttentionConfig

from .test_attention_io import OpCount


def old_project(att, x, mask, bt=None):
    """The previous projection: the whole of qkv widened to fp32, v included."""
    B, T = bt if bt is not None else x.shape[:2]
    H, D, N = att.cfg.heads, att.cfg.head_dim, att.cfg.banks
    qkv, sel = att.qkv(x), att.select(x)
    if bt is not None:
        qkv, sel = qkv[:B * T], sel[:B * T]
    q, k, v = upcast(qkv).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)
    sel = upcast(sel).view(B, T, -1)
    r = sel[..., :H * N].view(B, T, H, N).softmax(-1).transpose(1, 2)
    w = sel[..., H * N:2 * H * N].view(B, T, H, N).softmax(-1).transpose(1, 2)
    g = torch.sigmoid(sel[..., 2 * H * N:]).clamp(min=1e-6).transpose(1, 2)
    if mask is not None:
        w = w * mask[:, None, :, None].to(w.dtype)
    return feature_map(q), feature_map(k), v, r, w, g


def _run(att, x, S, z, mask, bt, fn=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, S1, z1 = att(x, S, z, mask, bt) if fn is None else fn(att, x, S, z, mask, bt)
    loss = y.float().square().sum() + S1.sum() + z1.square().sum()
    return loss, torch.autograd.grad(loss, [x, S, z] + list(att.parameters()))


def Casts() -> OpCount:
    """Dtype-changing copies."""
    return OpCount(lambda func, args, out: func.overloadpacket.__name__ == "_to_copy"
                   and out.dtype != args[0].dtype)


def _inputs():
    torch.manual_seed(0)
    att = BankedAttention(AttentionConfig(heads=2, head_dim=16, banks=3, chunk=16), 16)
    B, T, M = 3, 7, 24
    x = torch.randn(M, 16, requires_grad=True)
    S = torch.rand(B, 2, 3, 16, 16, requires_grad=True)
    z = torch.rand(B, 2, 3, 16, requires_grad=True)
    mask = torch.arange(T)[None, :] < torch.tensor([[7], [5], [2]])
    return att, (x, S, z, mask, (B, T))


def test_bf16_forward_and_gradients_match_the_widened_v_path(monkeypatch):
    """Under bf16 autocast (padded rows, a mask, incoming memory) the layer's output, memory
    and every gradient equal those of the previous projection (CPU path)."""
    att, args = _inputs()
    new = _run(att, *args)
    monkeypatch.setattr(BankedAttention, "_project", old_project)
    old = _run(att, *args)
    assert torch.allclose(new[0], old[0], rtol=1e-6, atol=0)
    for a, b in zip(new[1], old[1]):  # fp32 sums may add in another order: float tolerance
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()


def test_kernel_path_casts_less(monkeypatch):
    """On the kernels' path (the kernels replaced by the step bench's stand-in, as on the
    CPU there are none) v is no longer widened and cast back: fewer casts forward + backward,
    same result. The kernel route now makes its inputs without _project (attention_io, tested
    in test_attention_io.py): this drives _project's route as it was (old_forward there)."""
    from blocklm.model import attention, banked_triton
    from blocklm.tools.bench_train_ops import StandIn

    from .test_attention_io import old_forward

    monkeypatch.setattr(banked_triton, "BankedAttentionFn", StandIn)
    monkeypatch.setattr(attention, "kernel_path", lambda q, v, chunk: True)
    att, args = _inputs()
    with Casts() as new_casts:
        new = _run(att, *args, fn=old_forward)
    monkeypatch.setattr(BankedAttention, "_project", old_project)
    with Casts() as old_casts:
        old = _run(att, *args, fn=old_forward)
    assert torch.allclose(new[0], old[0], rtol=1e-6, atol=0)
    for a, b in zip(new[1], old[1]):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    # v's cast to bf16 forward and its cast back in backward are gone; the widening of q, k
    # no longer carries v's third either way
    assert new_casts.n == old_casts.n - 2
    n_v = 3 * 7 * 2 * 16  # v's elements: B*T*H*D
    assert old_casts.bytes - new_casts.bytes == n_v * (4 + 2 + 4 + 2)  # fp32 up, bf16 down, x2


def test_step_with_bf16_v_matches_chunked():
    """The recurrent step widens v itself (its projection may now be bf16)."""
    torch.manual_seed(1)
    att = BankedAttention(AttentionConfig(heads=2, head_dim=8, banks=3, chunk=4), 16)
    x = torch.randn(2, 5, 16)
    S = torch.zeros(2, 2, 3, 8, 8)
    z = torch.zeros(2, 2, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, S1, _ = att(x, S, z)
        ys, St, zt = [], S, z
        for t in range(5):
            yt, St, zt = att.step(x[:, t], St, zt)
            ys.append(yt)
    assert torch.allclose(torch.stack(ys, 1).float(), y.float(), atol=2e-2)
    assert torch.allclose(St, S1, atol=1e-4)
