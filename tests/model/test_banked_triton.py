"""The banked-attention kernels' reference agrees with the model's step form (CPU, always run);
the Triton kernels agree with the reference (GPU only; the kernels under Triton's CPU interpreter
when triton is installed)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blocklm.model import banked_triton as bt
from blocklm.model.attention import bank_read, bank_write, feature_map

CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None


def leaves(B, H, T, D, E, N, seed, state=True, device="cpu"):
    """Fresh random unconstrained inputs: q, k, v pre-feature-map, read/write/retention logits."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=gen) * scale + shift).to(device)

    xs = [rnd(B, H, T, D), rnd(B, H, T, D), rnd(B, H, T, E), rnd(B, H, T, N, scale=2.0),
          rnd(B, H, T, N, scale=2.0), rnd(B, H, T, scale=2.0, shift=1.0)]
    if state:
        xs += [torch.rand(B, H, N, D, E, generator=gen).to(device),
               torch.rand(B, H, N, D, generator=gen).to(device)]
    return [x.requires_grad_(True) for x in xs]


def project(xs, dtype=torch.float32):
    """Leaves -> the function's inputs (q, k, v in ``dtype``; r, w, g, states fp32)."""
    q, k, v = (feature_map(xs[0]).to(dtype), feature_map(xs[1]).to(dtype), xs[2].to(dtype))
    r, w, g = xs[3].softmax(-1), xs[4].softmax(-1), torch.sigmoid(xs[5])
    S0, z0 = (xs[6], xs[7]) if len(xs) > 6 else (None, None)
    return q, k, v, r, w, g, S0, z0


def step_form(q, k, v, r, w, g, S0, z0, eps):
    """The model's recurrent form: bank_write then bank_read, one step at a time."""
    B, H, T, D = q.shape
    E, N = v.shape[-1], r.shape[-1]
    S = S0 if S0 is not None else q.new_zeros(B, H, N, D, E)
    z = z0 if z0 is not None else q.new_zeros(B, H, N, D)
    outs = []
    for t in range(T):
        S, z = bank_write(S, z, k[:, :, t], v[:, :, t], w[:, :, t], g[:, :, t])
        outs.append(bank_read(S, z, q[:, :, t], r[:, :, t], eps))
    return torch.stack(outs, 2), S, z


def outputs_and_grads(fn, xs, dtype=torch.float32, chunk=None, seed=123):
    """Run fn on projected leaves; backprop fixed random cotangents of (out, S, z)."""
    args = project(xs, dtype)
    o, S, z = fn(*args, eps=1e-3) if chunk is None else fn(*args, eps=1e-3, chunk=chunk)
    gen = torch.Generator().manual_seed(seed)
    cot = [torch.randn(t.shape, generator=gen).to(t.device) for t in (o, S, z)]
    loss = sum((t.float() * c).sum() for t, c in zip((o, S, z), cot))
    grads = torch.autograd.grad(loss, xs)
    return [o.float(), S, z] + [gr.float() for gr in grads]


NAMES = ["out", "S", "z", "dq", "dk", "dv", "dr_logits", "dw_logits", "dg_logit", "dS0", "dz0"]


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("T,chunk,N,state", [(11, 4, 3, True), (9, 16, 2, False), (8, 8, 1, True)])
def test_reference_equals_step_form(T, chunk, N, state):
    xs = leaves(2, 2, T, 4, 5, N, seed=T + N, state=state)
    ref = outputs_and_grads(bt.banked_attention_reference, xs, chunk=chunk)
    step = outputs_and_grads(step_form, xs)
    for name, a, b in zip(NAMES, ref, step):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5), (name, (a - b).abs().max().item())


def test_dispatch_on_cpu_uses_reference():
    xs = leaves(1, 2, 10, 16, 16, 2, seed=3)
    a = bt.banked_attention(*project(xs), chunk=4)
    b = bt.banked_attention_reference(*project(xs), chunk=4)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_imports_without_triton(monkeypatch):
    import blocklm.model as pkg

    monkeypatch.setitem(sys.modules, "triton", None)  # `import triton` now raises ImportError
    monkeypatch.setitem(sys.modules, "triton.language", None)
    for name in ("banked_triton", "banked_kernels", "banked_kernels_bwd", "banked_backward",
                 "banked_launch", "banked_kernels_var",
                 "banked_kernels_mem"):  # restored afterwards
        monkeypatch.delitem(sys.modules, f"blocklm.model.{name}", raising=False)
        monkeypatch.setattr(pkg, name, getattr(pkg, name, None), raising=False)
    mod = importlib.import_module("blocklm.model.banked_triton")
    assert mod is not bt and not mod.HAS_TRITON
    xs = leaves(1, 1, 6, 16, 16, 2, seed=4)
    o, S, z = mod.banked_attention(*project(xs), chunk=4)
    assert o.shape == (1, 1, 6, 16) and S.shape == (1, 1, 2, 16, 16) and z.shape == (1, 1, 2, 16)


INTERP_PRELUDE = """
import sys, torch
import triton.runtime.interpreter as I
_orig = I._patch_lang_tensor
def _patched(tensor, scope):  # numpy >= 2 refuses int() of a 1-element array
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
I._patch_lang_tensor = _patched
sys.path.insert(0, {tests!r})
from test_banked_triton import leaves, outputs_and_grads, rel, NAMES
from blocklm.model import banked_triton as bt
"""


def run_interpreted(body: str, timeout: float = 300, interpret: bool = True, **fmt) -> str:
    """``INTERP_PRELUDE + body`` (``str.format``-ed with ``tests`` and ``fmt``) in a fresh process
    under ``TRITON_INTERPRET=1`` (``interpret=False``: compiled, on the GPU); asserts it exited 0
    and returns its stdout."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    if not interpret:
        del env["TRITON_INTERPRET"]
    code = (INTERP_PRELUDE + body).format(tests=str(Path(__file__).parent), **fmt)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return res.stdout


_INTERP = """
CASES = [(40, 16, 16, 3, 16, True, {{}}), (30, 16, 32, 1, 16, False, {{}}),
         (40, 16, 16, 3, 16, True, {{"save_blocks": 2}}),  # a memory saved every 2 blocks
         (130, 32, 64, 2, 32, False, {{"tile_dm": 16, "save_blocks": 2}}),  # spans, padded
         (50, 16, 32, 2, 16, True, {{"prep_in_intra": False}}),
         (50, 16, 32, 2, 16, True, {{"prep_in_intra": True}}),
         # two D-slices in the backward memory kernels, two E-slices in fwd_o_loop, bwd_hdot
         (70, 32, 32, 4, 32, True, {{"tile_dm": 16, "tile_v": 16, "fwd_o_loop": True,
                                     "tile_hk": 16}}),
         (50, 32, 16, 2, 16, False, {{"tile_dm": 16, "hdot_in_dv": False}}),
         (50, 32, 16, 2, 16, True, {{"hdot_in_dv": False, "save_blocks": 2}}),
         (40, 64, 64, 2, 16, True, {{}})]  # bwd_dv_mem's inner products in two row slices
for T, D, E, N, C, st, opts in CASES:
    saved = dict(bt.KERNEL_OPTS)
    bt.KERNEL_OPTS.update(opts)
    xs = leaves(1, 2, T, D, E, N, seed=T, state=st)
    a = outputs_and_grads(bt.banked_attention_triton, xs, chunk=C)
    b = outputs_and_grads(bt.banked_attention_reference, xs, chunk=C)
    bt.KERNEL_OPTS.update(saved)
    for name, x, y in zip(NAMES, a, b):
        e = rel(x, y) if y.norm() > 0 else x.norm().item()
        assert e < 1e-5, (T, N, opts, name, e)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_under_triton_interpreter():
    """fp32 inputs through the real kernels on the CPU (``TRITON_INTERPRET=1``, fresh process)."""
    assert "ok" in run_interpreted(_INTERP)


def test_batch_rows_reads_packed_state_slices_where_they_lie():
    """A layer's incoming memory is a slice of the packed per-example states (rows a whole
    state apart): the kernels take it with its row stride, no copy; other layouts and dtypes
    are copied to contiguous fp32."""
    from blocklm.model.banked_backward import batch_rows
    rows = torch.randn(3, 5 + 2 * 4 * 6 + 7)
    s = rows[:, 5:53].view(3, 2, 4, 6)
    got = batch_rows(s)
    assert got.data_ptr() == s.data_ptr() and got.stride() == s.stride()
    one = rows[:1, 5:53].view(1, 2, 1, 4, 6)  # size-1 dims: any stride
    assert batch_rows(one).data_ptr() == one.data_ptr()
    t = s.transpose(2, 3)  # rows not contiguous inside: copied
    assert batch_rows(t).is_contiguous() and torch.equal(batch_rows(t), t)
    h = s.to(torch.bfloat16)
    assert batch_rows(h).dtype == torch.float32 and batch_rows(h).is_contiguous()


_PACKED = """
import torch
from blocklm.model.banked_backward import batch_rows
dev = {device!r}


def packed(q, k, v, r, w, g, S0, z0, eps, chunk):
    # S0, z0 read as slices of packed rows (a state's layout: other parts around them), S, z
    # packed back, so their gradients reach the kernel as slices of one [B, size] gradient
    B, nS, nz = S0.shape[0], S0[0].numel(), z0[0].numel()
    rows = torch.cat([torch.zeros(B, 7, device=dev), S0.reshape(B, -1), z0.reshape(B, -1),
                      torch.ones(B, 5, device=dev)], 1)
    s, zz = rows[:, 7:7 + nS].view_as(S0), rows[:, 7 + nS:7 + nS + nz].view_as(z0)
    assert batch_rows(s).data_ptr() == s.data_ptr() and not s.is_contiguous()
    o, S, z = bt.banked_attention_triton(q, k, v, r, w, g, s, zz, eps=eps, chunk=chunk)
    out = torch.cat([S.reshape(B, -1), torch.zeros(B, 3, device=dev), z.reshape(B, -1)], 1)
    return o, out[:, :nS].view_as(S), out[:, -nz:].view_as(z)


def written_in_place(q, k, v, r, w, g, S0, z0, eps, chunk):
    # S, z written by the kernel into the slots of packed rows (out=), packed by PackInto
    from blocklm.model.state_pack import pack_into
    B, H, N, D, E = S0.shape
    nS, nz = H * N * D * E, H * N * D
    buf = torch.empty(B, 3 + nS + nz + 2, device=dev)
    slots = (buf[:, 3:3 + nS].view(B, H, N, D, E), buf[:, 3 + nS:3 + nS + nz].view(B, H, N, D))
    o, S, z = bt.banked_attention_triton(q, k, v, r, w, g, S0, z0, eps=eps, chunk=chunk,
                                         out=slots)
    assert S.data_ptr() == slots[0].data_ptr() and z.data_ptr() == slots[1].data_ptr()
    head, tail = torch.zeros(B, 3, device=dev), torch.ones(B, 2, device=dev)
    rows = pack_into(buf, ((0, 3), (3, 3 + nS), (3 + nS, 3 + nS + nz), (3 + nS + nz, 5 + nS + nz)),
                     [head, S, z, tail])
    assert rows.data_ptr() == buf.data_ptr()
    return o, rows[:, 3:3 + nS].view_as(S), rows[:, 3 + nS:3 + nS + nz].view_as(z)


for B, H, T, D, E, N, C in [(3, 2, 40, 16, 16, 3, 16), (2, 2, 70, 32, 16, 2, 32)]:
    xs = leaves(B, H, T, D, E, N, seed=T, state=True, device=dev)
    b = outputs_and_grads(bt.banked_attention_triton, xs, chunk=C)
    for fn in (packed, written_in_place):
        a = outputs_and_grads(fn, xs, chunk=C)
        for name, x, y in zip(NAMES, a, b):
            assert torch.equal(x, y), (fn.__name__, B, T, name, rel(x, y))
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_read_packed_state_slices_under_triton_interpreter():
    """Incoming memories and the gradients of the outgoing ones as strided slices of packed
    rows, and outgoing memories written by the kernel into such slices (``out``), give bitwise
    the results of contiguous ones (fp32, ``TRITON_INTERPRET=1``)."""
    assert "ok" in run_interpreted(_PACKED, device="cpu")


# ---- GPU: Triton against the fp32 reference on the same bf16-rounded inputs -----------------

GPU_CASES = [  # B, H, T, D, E, N, chunk, incoming state
    (2, 3, 200, 64, 64, 4, 64, True),  # T not a multiple of the chunk
    (1, 2, 256, 128, 128, 4, 64, False),
    (2, 2, 77, 32, 32, 1, 32, True),
    (1, 2, 300, 128, 128, 2, 128, True),
    (2, 1, 64, 64, 128, 3, 16, False),
    (1, 2, 2048, 64, 64, 4, 64, True),  # long: the decay gradient must not cancel over T
]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("case", GPU_CASES)
def test_triton_matches_reference_bf16(case):
    B, H, T, D, E, N, C, state = case
    xs = leaves(B, H, T, D, E, N, seed=sum(case), state=state, device="cuda")
    fast = outputs_and_grads(bt.banked_attention_triton, xs, dtype=torch.bfloat16, chunk=C)
    ref = outputs_and_grads(bt.banked_attention_reference, xs, dtype=torch.bfloat16, chunk=C)
    errs = {}
    for name, a, b in zip(NAMES, fast, ref):
        assert torch.isfinite(a).all(), name
        if b.norm() == 0:  # one bank: the selectors' logits get exactly zero gradient
            assert a.norm() == 0, name
            continue
        errs[name] = rel(a, b)
    print(case, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    bad = {k: v for k, v in errs.items() if not v < 2e-2}
    assert not bad, bad


VARIANTS = [{"fwd_o_loop": True, "hdot_in_dv": False}, {"tile_v": 64, "tile_h": 128},
            {"tile_dm": 64, "tile_h": 128, "tile_hk": None}, {"tile_dm": 32, "warps_mem": 8},
            {"tile_hv": 64, "warps_h": 8, "warps_intra": 8},  # tile_h 128: the long-T tiles
            {"save_blocks": 2}, {"hdot_in_dv": False, "save_blocks": 2},
            {"prep_in_intra": False, "stages_mem": 2},
            {"prep_in_intra": True, "warps_h": 8, "stages_h": 2, "hdot_rows": 32},
            {"low_partials": False}, {"low_partials": False, "save_blocks": 2},
            {"fast_launch": False}, {"maxnreg_h": 128, "stages_h": 1}]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("opts", VARIANTS)
def test_launch_variants_match_reference_bf16(opts, monkeypatch):
    """Every launch setting the benchmark sweeps computes the same function (D = E = 128)."""
    monkeypatch.setattr(bt, "KERNEL_OPTS", {**bt.KERNEL_OPTS, **opts})
    xs = leaves(1, 2, 200, 128, 128, 4, seed=11, state=True, device="cuda")
    fast = outputs_and_grads(bt.banked_attention_triton, xs, dtype=torch.bfloat16, chunk=64)
    ref = outputs_and_grads(bt.banked_attention_reference, xs, dtype=torch.bfloat16, chunk=64)
    errs = {name: rel(a, b) for name, a, b in zip(NAMES, fast, ref)}
    print(opts, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert all(torch.isfinite(a).all() for a in fast)
    assert max(errs.values()) < 2e-2, errs


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernels_read_packed_state_slices_on_cuda():
    """As the interpreter test, on the GPU (fp32 inputs, the cached direct launches)."""
    assert "ok" in run_interpreted(_PACKED, device="cuda", interpret=False)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_dispatch_on_cuda_uses_triton_and_fp32_works(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return triton_fn(*args, **kwargs)

    triton_fn = bt.banked_attention_triton
    monkeypatch.setattr(bt, "banked_attention_triton", spy)
    xs = leaves(1, 2, 100, 64, 64, 4, seed=7, device="cuda")
    fast = outputs_and_grads(bt.banked_attention, xs, chunk=64)  # fp32 inputs: tf32 dots
    assert calls
    ref = outputs_and_grads(bt.banked_attention_reference, xs, chunk=64)
    errs = {name: rel(a, b) for name, a, b in zip(NAMES, fast, ref)}
    print("fp32", " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert max(errs.values()) < 1e-2, errs
    assert fast[0].dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_cached_launches_and_unused_outputs(monkeypatch):
    """Repeated calls (direct launches from the cache after the first) give bitwise the results
    of Triton's ordinary launch path; an unaligned input takes that path; only
    out used: S and z get no gradient (none materialised) and the rest matches the reference."""
    from blocklm.model import banked_launch as BL

    xs = leaves(2, 2, 192, 64, 64, 4, seed=5, state=False, device="cuda")
    dout = torch.randn(2, 2, 192, 64, device="cuda")

    def run(unaligned=False):
        q, k, v, r, w, g, _, _ = project(xs, torch.bfloat16)
        if unaligned:  # same values, address off by 2 bytes
            q = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view_as(q).copy_(q)
        o = bt.banked_attention_triton(q, k, v, r, w, g, eps=1e-3, chunk=64)[0]
        return [o] + list(torch.autograd.grad((o.float() * dout).sum(), xs[:6]))

    first = run()
    assert any(e[4] is not None for e in BL._CACHE.values())
    again = [run() for _ in range(2)]
    unaligned = run(unaligned=True)  # compiled without the alignment hint: same maths
    monkeypatch.setitem(bt.KERNEL_OPTS, "fast_launch", False)
    slow = run()
    for res in again + [slow]:
        for a, b in zip(first, res):
            assert torch.equal(a, b)
    assert max(rel(a.float(), b.float()) for a, b in zip(first, unaligned)) < 1e-3
    q, k, v, r, w, g, _, _ = project(xs, torch.bfloat16)
    o = bt.banked_attention_reference(q, k, v, r, w, g, eps=1e-3, chunk=64)[0]
    ref = [o] + list(torch.autograd.grad((o.float() * dout).sum(), xs[:6]))
    errs = [rel(a.float(), b.float()) for a, b in zip(first, ref)]
    print("only out", " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < 2e-2, errs
