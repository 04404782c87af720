"""Opt-in launch variants of the banked-attention kernels (``KERNEL_OPTS``) against the PyTorch
reference: outputs and every gradient, fp32 inputs, tiny shapes, through the real kernels under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, a fresh process); on CUDA also in bf16 at
D = E = 128 (the shape the benchmark sweeps)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from blocklm.model import banked_triton as bt

sys.path.insert(0, str(Path(__file__).parent))  # the shared helpers (tests are not a package)
from test_banked_triton import (  # noqa: E402
    CUDA,
    HAS_TRITON,
    NAMES,
    leaves,
    outputs_and_grads,
    rel,
    run_interpreted,
)

from blocklm.tools.bench_gpu import SWEEPS  # noqa: E402

# (T, D, E, N, chunk, incoming memory, options): odd lengths (padded), N = 1 and 4, with and
# without S0, spans of 2 blocks, two E-tiles in the state kernels (two row sets of partials)
CASES = [
    (37, 16, 16, 4, 16, True, {"hdot_in_dh": True}),
    (21, 16, 32, 1, 16, False, {"hdot_in_dh": True}),
    (45, 32, 32, 4, 16, False, {"hdot_in_dh": True, "save_blocks": 2}),
    (37, 16, 32, 4, 16, True, {"hdot_in_dh": 2}),
    (30, 32, 16, 1, 16, False, {"hdot_in_dh": 2, "tile_h": 16, "tile_hk": None}),
    (40, 16, 32, 2, 16, True, {"hdot_in_dh": True, "tile_h": 16, "tile_hk": None}),
    (37, 16, 16, 4, 16, True, {"fwd_o_lean": True}),
    (21, 32, 16, 1, 16, False, {"fwd_o_lean": True}),
    (50, 32, 32, 3, 16, True, {"fwd_o_lean": True, "tile_vo": 16}),  # two E-tiles
    (45, 16, 16, 4, 16, False, {"fwd_o_lean": True, "save_blocks": 2}),  # R = 2: fwd_o
    (44, 16, 32, 4, 16, True, {"fwd_o_lean": True, "hdot_in_dh": True, "maxnreg_o": 128,
                               "stages_o": 2}),
    (37, 16, 16, 4, 16, True, {"intra_lean": True, "prep_in_intra": True}),
    (21, 32, 16, 1, 16, False, {"intra_lean": True, "prep_in_intra": False}),
    (50, 32, 32, 3, 16, True, {"intra_lean": True, "tile_dm": 16}),  # two D- and E-slices
    (45, 16, 16, 2, 16, False, {"intra_lean": True, "save_blocks": 2}),  # R = 2: bwd_intra
    (37, 16, 16, 4, 16, True, {"prefetch_dh": True}),
    (13, 16, 16, 1, 16, True, {"prefetch_dh": True}),  # one chunk: the prefetch clamps
    (45, 32, 32, 2, 16, False, {"prefetch_dh": True, "hdot_in_dh": 2, "save_blocks": 2}),
    (40, 16, 32, 3, 16, True, {"prefetch_dh": True, "hdot_in_dh": 1, "tile_h": 16,
                               "tile_hk": None}),  # two E-tiles: dden only in i_v == 0
]
CASES += [(29, 16, 16, 4, 16, True, v) for v in SWEEPS["kern3"] if v]  # as the bench runs them
# mem_fuse (the memory parts as one launch of interleaved paths): dv in one or two E-tiles, two
# D-slices in the read/write paths, N = 1, 3, 4; with R = 2 or hdot_in_dh it falls back to the
# three kernels
CASES += [
    (37, 16, 32, 4, 16, True, {"mem_fuse": 2}),
    (21, 32, 16, 1, 16, False, {"mem_fuse": 1}),
    (50, 32, 32, 3, 16, True, {"mem_fuse": 2, "tile_dmf": 16}),
    (45, 16, 32, 4, 16, False, {"mem_fuse": 2, "save_blocks": 2}),
    (40, 16, 32, 2, 16, True, {"mem_fuse": 1, "hdot_in_dh": 2}),
]
CASES += [(29, 16, 32, 4, 16, True, v) for v in SWEEPS["kern9"] + SWEEPS["kern9b"] if v]
CASES += [(35, 16, 64, 2, 16, False, {"mem_fuse": 4, "tile_dmf": 16}),  # dv in 4 E-tiles
          (35, 16, 16, 3, 16, True, {"mem_fuse": 2}),  # E = 16: dv in one E-tile
          (37, 16, 32, 4, 16, True, {"launch_first": False}),  # kernels launched inside apply
          # hdot_mf: the inner-product path pipelined; one or four steps per bank, N = 1, 3, 4
          (37, 16, 32, 4, 16, True, {"hdot_mf": 3}),
          (50, 32, 32, 3, 16, False, {"hdot_mf": 3, "tile_hdf": 8}),
          (21, 32, 16, 1, 16, True, {"hdot_mf": 1, "tile_hdf": 16, "mem_fuse": 1}),
          (37, 16, 32, 4, 16, True, {"hdot_mf": 0})]  # the path before (default until kern2-2)
CASES += [(29, 16, 32, 4, 16, True, v) for v in SWEEPS["kern2"] if v]

_RUN = """
for T, D, E, N, C, st, opts in {cases!r}:
    saved = dict(bt.KERNEL_OPTS)
    bt.KERNEL_OPTS.update(opts)
    xs = leaves(1, 2, T, D, E, N, seed=T + N, state=st)
    a = outputs_and_grads(bt.banked_attention_triton, xs, chunk=C)
    bt.KERNEL_OPTS.clear()
    bt.KERNEL_OPTS.update(saved)
    b = outputs_and_grads(bt.banked_attention_reference, xs, chunk=C)
    for name, x, y in zip(NAMES, a, b):
        e = rel(x, y) if y.norm() > 0 else x.norm().item()
        assert e < 1e-5, (T, N, opts, name, e)
    print("case ok", T, N, opts)
print("ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_variants_under_triton_interpreter():
    """Each opt-in variant computes the reference's function (all outputs and gradients)."""
    out = run_interpreted(_RUN, cases=CASES)
    assert out.count("case ok") == len(CASES), out[-2000:]


_FUSED_LAUNCHES = """
from blocklm.model import banked_launch as BL
names = []
_call = BL.Launcher.__call__
def spy(self, kern, grid, *a, **k):
    names.append(getattr(kern, "__name__", getattr(getattr(kern, "fn", None), "__name__", "")))
    return _call(self, kern, grid, *a, **k)
BL.Launcher.__call__ = spy
bt.KERNEL_OPTS["mem_fuse"] = 2
xs = leaves(1, 2, 40, 16, 32, 4, seed=3)
a = outputs_and_grads(bt.banked_attention_triton, xs, chunk=16)
print("launched", sorted(set(names)))
assert "bwd_mem_all" in names, names
assert not set(names) & set(["bwd_mem_read", "bwd_mem_write", "bwd_dv_mem", "bwd_hdot"])
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_mem_fuse_replaces_the_three_memory_kernels():
    """With mem_fuse the backward launches bwd_mem_all and none of the kernels it replaces (the
    interpreter cases above then check its results)."""
    assert "launched" in run_interpreted(_FUSED_LAUNCHES, timeout=120)


_LEAN_BF16 = """
from test_banked_triton import project
xs = leaves(1, 2, 40, 32, 16, 4, seed=5)
q, k, v, r, w, g, S0, z0 = (x.detach() for x in project(xs))
q, k = q.half(), k.half()  # v stays fp32: out is not rounded, only q . z can differ
with torch.no_grad():
    a = bt.banked_attention_triton(q, k, v, r, w, g, S0, z0 * 50, chunk=16)[0]
    bt.KERNEL_OPTS["fwd_o_lean"] = True
    b = bt.banked_attention_triton(q, k, v, r, w, g, S0, z0 * 50, chunk=16)[0]
e = rel(b, a)
assert e < 1e-6, e
print("ok", e)
"""


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_lean_normaliser_keeps_z_precision_with_bf16_q():
    """fwd_o_lean takes q . z_start as a dot of z split into high and low parts in q's dtype:
    with 16-bit q its outputs match fwd_o's fp32 products closely (fp16 here: the interpreter
    has no bf16; z rounded to q's dtype alone would be ~1e-4 off)."""
    assert "ok" in run_interpreted(_LEAN_BF16, timeout=120)


GPU_VARIANTS = [{"hdot_in_dh": True}, {"hdot_in_dh": True, "save_blocks": 2},
                {"hdot_in_dh": 2}, {"hdot_in_dh": 2, "stages_dv": 2},
                {"hdot_in_dh": True, "tile_hv": 64}, {"fwd_o_lean": True},
                {"fwd_o_lean": True, "maxnreg_o": 128, "stages_o": 2},
                {"fwd_o_lean": True, "tile_vo": 64}, {"fwd_o_lean": True, "tile_v": 64},
                {"intra_lean": True}, {"intra_lean": True, "prep_in_intra": True},
                {"prefetch_dh": True}, {"prefetch_dh": True, "hdot_in_dh": 1},
                {"fwd_o_lean": True, "maxnreg_o": 128, "stages_o": 2, "hdot_in_dh": 2,
                 "stages_dv": 2, "intra_lean": True, "prefetch_dh": True},  # the sweep's "all"
                {"prep_in_intra": True}, {"warps_intra": 8}, {"stages_mem": 3},
                {"warps_dv": 4}, {"warps_mem": 8}, {"tile_hk": None},  # sweep m1's knobs
                {"mem_fuse": 2}, {"mem_fuse": 1, "tile_dmf": 64},  # GPU_NOTES kern 22:15
                {"mem_fuse": 2, "tile_dmf": 64}, {"mem_fuse": 2, "tile_dmf": 64,
                                                  "maxnreg_mem": 168},
                {"mem_fuse": 2, "tile_dmf": 64, "warps_mem": 8},
                {"prep_in_intra": False},  # bwd_prep launched first (T > 2048 by default)
                bt.PRE_FUSE, {"tile_dmf": 32, "maxnreg_mem": None},  # sweep kern9b
                {"tile_dmf": 32, "stages_mem": 2, "maxnreg_mem": None},
                {"mem_fuse": 4, "tile_dmf": 32, "maxnreg_mem": 96}, {"launch_first": False},
                {"hdot_mf": 3}, {"hdot_mf": 3, "tile_hdf": 64}, {"hdot_mf": 4},  # sweep kern2
                {"hdot_mf": 2, "tile_hdf": 64}, {"hdot_mf": 1}, {"hdot_mf": 0}]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
@pytest.mark.parametrize("opts", GPU_VARIANTS, ids=lambda o: "-".join(f"{k}{v}" for k, v in
                                                                     o.items()))
@pytest.mark.parametrize("state", [True, False])
def test_variant_matches_reference_bf16(opts, state, monkeypatch):
    """bf16 at D = E = 128, N = 4, T = 200 (padded): errors as the defaults' (< 2e-2)."""
    monkeypatch.setattr(bt, "KERNEL_OPTS", {**bt.KERNEL_OPTS, **opts})
    xs = leaves(1, 2, 200, 128, 128, 4, seed=13, state=state, device="cuda")
    fast = outputs_and_grads(bt.banked_attention_triton, xs, dtype=torch.bfloat16, chunk=64)
    ref = outputs_and_grads(bt.banked_attention_reference, xs, dtype=torch.bfloat16, chunk=64)
    errs = {name: rel(a, b) for name, a, b in zip(NAMES, fast, ref) if b.norm() > 0}
    print(opts, state, " ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    assert all(torch.isfinite(a).all() for a in fast)
    assert max(errs.values()) < 2e-2, errs


def test_sweep_variants_name_real_options():
    """Every option a bench sweep sets exists in KERNEL_OPTS (an unknown key would be added
    silently and the 'variant' would time the defaults)."""
    for name, variants in SWEEPS.items():
        for v in variants:
            assert set(v) <= set(bt.KERNEL_OPTS), (name, set(v) - set(bt.KERNEL_OPTS))
    assert all(set(o) <= set(bt.KERNEL_OPTS) for o in GPU_VARIANTS)
    assert {k for v in SWEEPS["kern3"] for k in v} >= {"hdot_in_dh", "fwd_o_lean"}
    # the kern4 sweep's "old defaults" entry undoes exactly what call kern3 turned on
    assert bt.OLD_DEFAULTS in SWEEPS["kern4"]
    assert all(bt.KERNEL_OPTS[k] != v for k, v in bt.OLD_DEFAULTS.items())
    assert bt.PRE_FUSE in SWEEPS["kern9b"]  # the set before the fused memory launch
    assert all(bt.KERNEL_OPTS[k] != v for k, v in bt.PRE_FUSE.items())
