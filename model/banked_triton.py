"""Banked, write-decayed causal linear attention: Triton forward + backward, PyTorch reference.

The function (see :mod:`blocklm.model.attention`): per batch, head and step t, bank n is written
``S_n <- a_n S_n + w_n k v^T``, ``z_n <- a_n z_n + w_n k`` with ``a_n = 1 - w_n (1 - g)``, then
read ``out = sum_n r_n q^T S_n / (sum_n r_n q . z_n + eps)``.

Layout (the one :meth:`BankedAttention._project` produces): q, k [B,H,T,D] (already feature-mapped,
> 0), v [B,H,T,E], r, w [B,H,T,N] (probabilities), g [B,H,T] (retention in (0, 1)); optional
incoming memory S0 [B,H,N,D,E], z0 [B,H,N,D] (fp32). Returns out [B,H,T,E] (v's dtype) and the
outgoing memory S [B,H,N,D,E], z [B,H,N,D] (fp32).

Chunked form (chunk C): with c[t,n] the chunk-local inclusive cumsum of ``log a``, the intra-chunk
scores are ``(q k^T) * M``, ``M[t,s] = sum_n r[t,n] w[s,n] exp(c[t,n] - c[s,n])`` (s <= t), an
O(C^2 N) scalar mix; only the chunk-start memory terms are per bank. Every exp is of a
non-positive difference taken inside a chunk, so nothing overflows however strong the decay.

The kernels live in :mod:`blocklm.model.banked_kernels` (forward, state kernels) and
``banked_kernels_bwd`` (parallel backward kernels); :class:`BankedAttentionFn` launches them
(bf16 operands, fp32 accumulation, fp32 recurrent states) through
:mod:`blocklm.model.banked_launch`, the backward's sequence in :mod:`blocklm.model.banked_backward`.
The gradient of the log-decays is ``dc[t,n] = r dr - w dw`` plus, at each chunk's last step, the
inner product of the chunk-end memory with its gradient; its reverse cumsum within the chunk is
the gradient of log a.

:func:`banked_attention` dispatches: Triton on CUDA when importable and the shapes suit it,
otherwise :func:`banked_attention_reference` (plain PyTorch, chunked, fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .banked_backward import backward, batch_rows, ispec, pow2, rows_contiguous, tiles
from .banked_kernels import HAS_TRITON
from .banked_launch import Launcher, aligned, on_device

if HAS_TRITON:
    from . import banked_kernels as K
    from . import banked_kernels_var as KV


def banked_attention_reference(q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor,
                               S0: Tensor | None = None, z0: Tensor | None = None,
                               eps: float = 1e-3, chunk: int = 64
                               ) -> tuple[Tensor, Tensor, Tensor]:
    """Plain PyTorch chunked form (the CPU path and the kernels' reference); computes in fp32
    (fp64 stays fp64). Shapes as in the module docstring; returns (out, S, z)."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    q, k, v, r, w, g = (x.to(dt) for x in (q, k, v, r, w, g))
    B, H, T, D = q.shape
    E, N = v.shape[-1], r.shape[-1]
    S = q.new_zeros(B, H, N, D, E) if S0 is None else S0.to(dt)
    z = q.new_zeros(B, H, N, D) if z0 is None else z0.to(dt)
    la = torch.log1p(-w * (1.0 - g[..., None]))  # [B,H,T,N]
    outs = []
    for t0 in range(0, T, chunk):
        sl = slice(t0, min(T, t0 + chunk))
        qc, kc, vc, rc, wc = q[:, :, sl], k[:, :, sl], v[:, :, sl], r[:, :, sl], w[:, :, sl]
        c = la[:, :, sl].cumsum(2)  # [B,H,c,N]
        n = qc.shape[2]
        causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        diff = (c[:, :, :, None, :] - c[:, :, None, :, :]).masked_fill(
            ~causal[None, None, :, :, None], float("-inf"))  # [B,H,t,s,N]
        M = (rc[:, :, :, None, :] * wc[:, :, None, :, :] * diff.exp()).sum(-1)  # [B,H,t,s]
        A = (qc @ kc.transpose(-1, -2)) * M
        rq = rc * c.exp()  # read weight on the chunk-start memory
        num = A @ vc + torch.einsum("bhtn,bhtd,bhnde->bhte", rq, qc, S)
        den = A.sum(-1) + torch.einsum("bhtn,bhtd,bhnd->bht", rq, qc, z)
        outs.append(num / (den[..., None] + eps))
        cT = c[:, :, -1]  # [B,H,N]
        wd = wc * (cT[:, :, None, :] - c).exp()  # write weight decayed to the chunk end
        S = cT.exp()[..., None, None] * S + torch.einsum("bhtn,bhtd,bhte->bhnde", wd, kc, vc)
        z = cT.exp()[..., None] * z + torch.einsum("bhtn,bhtd->bhnd", wd, kc)
    return torch.cat(outs, 2), S, z


# Launch settings (tile widths, warps per program, fusions); benchmarks may sweep them. Defaults:
# the best measured on an H200 at B=4, H=16, D=128, N=4 (model/GPU_NOTES.md). tile_h None:
# 128-wide state tiles when that still leaves >= 128 sequential programs (B*H*N*(D/128)*(E/128)),
# else 64 (measured at 16K: N=4 13.0 ms with 128 vs 13.6 with 64; N=1, 64 programs, 6.8 vs 5.4
# ms); `short` > 0 also takes 64 for sequences of at most that many chunks (off: at 1K the
# call is host-bound, ~0.94 ms of host time against ~0.76 ms on the GPU, and 64 x 64 tiles made
# the state kernels slower there, call 16); tile_hk / tile_hv override its D / E side. tile_dm: D-slice of the backward memory and
# intra kernels; stages_mem: the memory kernels' pipelining depth (None: Triton's default).
# hdot_in_dv: <dS_end, S_start> in bwd_dv_mem (when its E-tile is all of E) instead of
# bwd_hdot; fwd_o_loop: fwd_o over E slices. Kernel times of the choices at 16K, N=4:
# model/GPU_NOTES.md, calls 13-14 (fusing hdot into the reads kernel or dv into the writes
# kernel cost as much as it saved, through register pressure).
# save_blocks R: memories saved every R blocks of C rows (a span of R*C <= 128 rows; R = 2
# halves the saved-memory bytes and the sequential steps, at the cost of one unmasked score
# tile per span; 1 or 2; fwd_o_loop takes 1): 2 measured slower (16K 12.8 vs 8.7 ms, call K1:
# bwd_intra spilled with three tiles per program, and the memory kernels gained little).
# prep_in_intra: the output-gradient split inside bwd_intra (else its own launch, bwd_prep);
# None: inside for T <= 2048 (host-bound: one launch fewer), apart above (call K2: 16K 8.69 vs
# 8.79 ms, 4K 2.38 vs 2.49: the fused bwd_intra grew by more than bwd_prep's time).
# stages_h: pipelining depth of the state kernels; hdot_rows: rows per step of bwd_dv_mem's
# inner products (None: 2048 // E).
# low_partials: bwd_intra's partials of dq, dk, dv in the inputs' dtype instead of fp32 (at 16K,
# N=4, 1.6 of their 3.2 GB of traffic; one more bf16 rounding of the intra part). (Recomputing
# the intra part inside the memory kernels instead cost more than the partials' bytes: call K5.)
# fast_launch: cached direct launches (model/banked_launch.py; the 1K call is host-bound).
# launch_first: the forward's kernels launched before autograd's bookkeeping of the call (_apply).
# hdot_mf S (mem_fuse; 0: off): the fused launch's inner-product path loads [tile_hdf, E] steps of
# hs and dhs pipelined S deep (1: not pipelined) and sums each at once (_hdot_wide), instead of
# waiting on every 16 KB step; tile_hdf: its rows per step (None: 4096 / E). GPU_NOTES "kern2":
# hdot_mf 4 the default since call kern2-2 (bwd_mem_all 0.68 -> 0.63 ms at 4K, 2.68 -> 2.49 at
# 16K; 4K per call lower in all 4 alternating pairs, 1.85-1.88 against 1.91-1.93).
# maxnreg_h: register cap of the state kernels (None: the compiler's choice, 212-226 at 4 warps:
# 2 programs per SM, so 512 sequential programs at B*H=64, N=4 run as 1.94 waves, ncu call K6).
# 128 fits 4 per SM (one wave) with ~50 spilled values but measured slower (call K7: 16K 9.54
# vs 8.29 ms; it needs num_stages 1 to fit, which alone gave 9.52): the steps are throughput-bound
# per SM, not latency-bound.
# Variants of GPU_NOTES "kern, 2026-11-23" (timed in call kern3; defaults below): hdot_in_dh:
# the decay's inner products <dS_end, S_start> in bwd_dh, from the gradient tile it stores (one
# more read of hs there, a kernel at ~46% of DRAM bandwidth; 1: elementwise, 2: the diagonal of
# a dot, whose operand the compiler prefetches) instead of bwd_dv_mem's extra pass over hs; without
# that pass bwd_dv_mem needs 115 KB of shared memory at 3 stages (one program per SM), stages_dv 2
# fits two. fwd_o_lean (R = 1): fwd_o with fewer live tiles (136 registers at 8 warps, not 255);
# with maxnreg_o 128 and stages_o 2 (no spills) two programs fit an SM, as with tile_vo 64 (its
# own E-tile, None: tile_v; 102 registers). stages_o, maxnreg_o: fwd_o's pipelining depth, register cap.
# intra_lean (R = 1): bwd_intra with r, w, c loaded once per block, not per bank and loop.
# prefetch_dh: bwd_dh's chunk-end decay a step ahead, dden as a pipelined vector (no waits).
# mem_fuse NV (R = 1; 0: off): the memory parts (reads, writes, inner products, dv in NV E-tiles,
# at most E / 16) as one launch whose programs of one chunk are neighbours, so each saved memory
# comes from DRAM about once, not twice (banked_kernels_mem.py; GPU_NOTES "kern, 2026-11-23
# 22:15"); tile_dmf: D-slice of its read and write paths (None: tile_dm; 64: 174 registers, not
# 255 with 92 bytes spilled, ptxas sm_90), maxnreg_mem: its register cap (168: 3 programs per SM).
KERNEL_OPTS = {"tile_h": None, "tile_hk": 64, "tile_hv": None, "tile_v": 128, "warps_h": 4,
               "warps_o": 8, "warps_intra": 4, "tile_dm": 128, "warps_mem": 4, "warps_dv": 8,
               "stages_mem": None, "hdot_in_dv": True, "fwd_o_loop": False, "short": 0,
               "save_blocks": 1, "prep_in_intra": None, "stages_h": None, "hdot_rows": None,
               "low_partials": True, "fast_launch": True, "maxnreg_h": None, "hdot_in_dh": False,
               "fwd_o_lean": True, "stages_o": 2, "maxnreg_o": 128, "stages_dv": None,
               "tile_vo": None, "intra_lean": True, "prefetch_dh": True, "mem_fuse": 2,
               "tile_dmf": 64, "maxnreg_mem": 168,
               "launch_first": True, "hdot_mf": 4, "tile_hdf": None}
# The defaults since call kern3 (GPU_NOTES "Lead, 2026-11-23 15:50"): fwd_o_lean capped at 128
# registers with 2 stages, intra_lean and prefetch_dh each beat both default samples of the same
# sweep at 4K and 16K (4K 2.30-2.31 -> 2.21 / 2.18 / 2.20 ms; 16K 8.28-8.29 -> 7.96 / 8.11 /
# 8.10), 1K within 0.04 ms. OLD_DEFAULTS is the set they replaced (bench sweeps time it beside).
OLD_DEFAULTS = {"fwd_o_lean": False, "stages_o": None, "maxnreg_o": None, "intra_lean": False,
                "prefetch_dh": False}
# mem_fuse 2 with tile_dmf 64 and maxnreg_mem 168 since call kern9-1 (GPU_NOTES "kern, 2026-11-23
# 22:15"): 4K 2.18 / 2.10 -> 1.96 ms, 16K 7.91 / 7.83 -> 7.21, 1K 0.73 / 0.78 -> 0.76 (same
# sweep), its kernel 0.68 ms at 4K against the three kernels' 0.82. PRE_FUSE: the set before.
PRE_FUSE = {"mem_fuse": 0, "tile_dmf": None, "maxnreg_mem": None}


def _decay(L, w: Tensor, g: Tensor, C: int) -> Tensor:
    """Chunk-local cumsum of log a, [B,H,T,N] fp32 (one small kernel)."""
    B, H, T, N = w.shape
    c = torch.empty(B, H, T, N, device=w.device, dtype=torch.float32)
    L(K.decay_prep, (T // C, B * H), w, g, c, N=N, NP=pow2(N), C=C)
    return c


def _save_blocks(C: int) -> int:
    """Blocks per saved memory (R): the option where the span stays <= 128 rows, else 1."""
    R = KERNEL_OPTS["save_blocks"]
    return R if R == 2 and C * R <= 128 and not KERNEL_OPTS["fwd_o_loop"] else 1


class Launched:
    """The forward's kernels as launched for one call: outputs (o, ST, zT), the tensors the
    backward needs, the launch key and path, (has_s0, C, R)."""

    __slots__ = ("o", "ST", "zT", "saved", "key", "fast", "meta")


def out_rows(out: tuple[Tensor, Tensor] | None, B: int, H: int, N: int, D: int, E: int
             ) -> tuple[Tensor, Tensor] | None:
    """``out`` (S, z destinations: the slots of a packed state) when the kernel can write them
    in place (fp32, shapes [B,H,N,D,E] and [B,H,N,D], each batch row contiguous), else None."""
    if out is None:
        return None
    S, z = out
    if S.shape != (B, H, N, D, E) or z.shape != (B, H, N, D) or \
            S.dtype != torch.float32 or z.dtype != torch.float32:
        return None
    return (S, z) if rows_contiguous(S) and rows_contiguous(z) else None


def launch_forward(q, k, v, r, w, g, S0, z0, eps, C, R, out=None) -> Launched:
    """Launch the forward's kernels on padded, contiguous inputs (T a multiple of R*C); autograd
    plays no part (inputs are read, nothing is recorded). ``out``: where to write the outgoing
    memories (S, z; see :func:`out_rows`), else new tensors."""
    B, H, T, D = q.shape
    E, N = v.shape[-1], r.shape[-1]
    NT, NS, CS = T // C, T // (C * R), C * R
    opt = KERNEL_OPTS
    BK, BV, BO = tiles(opt, B * H * N, NS, D, E)
    dev = q.device
    has_s0 = S0 is not None
    # the incoming memories where they lie (slices of the packed states: rows a state apart)
    s0 = batch_rows(S0) if has_s0 else None
    zz0 = batch_rows(z0) if has_s0 else None
    sS0, sz0 = (s0.stride(0), zz0.stride(0)) if has_s0 else (0, 0)
    out = out_rows(out, B, H, N, D, E)
    if out is None:
        ST = torch.empty(B, H, N, D, E, device=dev, dtype=torch.float32)
        zT = torch.empty(B, H, N, D, device=dev, dtype=torch.float32)
    else:
        ST, zT = out
    f = Launched()
    # the launch key: dtypes and integer specialisations (model/banked_launch.py)
    f.key = (q.dtype, k.dtype, v.dtype, r.dtype, w.dtype, g.dtype, ispec(NT), ispec(NS),
             ispec(sS0), ispec(sz0), ispec(ST.stride(0)), ispec(zT.stride(0)), ispec(H * N))
    f.fast = opt["fast_launch"] and aligned(q, k, v, r, w, g, s0, zz0, ST, zT) and \
        on_device(dev, k, v, r, w, g, s0, zz0, ST, zT)
    L = Launcher(dev, f.key, f.fast)
    c = _decay(L, w, g, CS)  # cumsum of log a from each span's start
    hs = torch.empty(B * H * NS * N * D * E, device=dev, dtype=v.dtype)
    zs = torch.empty(B * H * NS * N * D, device=dev, dtype=torch.float32)
    L(K.fwd_h, (D // BK, E // BV, B * H * N), k, v, w, c, hs, zs,
      s0 if has_s0 else ST, zz0 if has_s0 else zT, ST, zT, NS, sS0, sz0, ST.stride(0),
      zT.stride(0), H * N, N=N, D=D, E=E, C=CS, BK=BK, BV=BV, HAS_S0=has_s0,
      num_warps=opt["warps_h"], num_stages=opt["stages_h"], maxnreg=opt["maxnreg_h"])
    o = torch.empty(B, H, T, E, device=dev, dtype=v.dtype)
    den = torch.empty(B, H, T, device=dev, dtype=torch.float32)
    if opt["fwd_o_lean"] and R == 1 and not opt["fwd_o_loop"]:
        BL = min(E, opt["tile_vo"] or BO)  # its own E-tile (bwd_dv_mem keeps tile_v)
        L(KV.fwd_o_lean, (E // BL, NT, B * H), q, k, v, r, w, c, hs, zs, o, den, NT, eps,
          N=N, D=D, E=E, C=C, BV=BL, ZW=max(16, pow2(2 * N)), num_warps=opt["warps_o"],
          num_stages=opt["stages_o"], maxnreg=opt["maxnreg_o"])
    elif opt["fwd_o_loop"]:
        L(KV.fwd_o_loop, (NT, B * H), q, k, v, r, w, c, hs, zs, o, den, NT, eps, N=N,
          NP=pow2(N), D=D, E=E, C=C, BV=BO, num_warps=opt["warps_o"])
    else:
        L(K.fwd_o, (E // BO, NT, B * H), q, k, v, r, w, c, hs, zs, o, den, NT, eps, N=N,
          D=D, E=E, C=C, BV=BO, R=R, num_warps=opt["warps_o"],
          # the lean kernel's cap and stages do not fit fwd_o (255 registers): R = 2 with
          # fwd_o_lean set takes fwd_o at the compiler's own choices
          num_stages=None if opt["fwd_o_lean"] else opt["stages_o"],
          maxnreg=None if opt["fwd_o_lean"] else opt["maxnreg_o"])
    f.o, f.ST, f.zT = o, ST, zT
    f.saved = (q, k, v, r, w, g, c, hs, zs, o, den)
    f.meta = (has_s0, C, R)
    return f


class BankedAttentionFn(torch.autograd.Function):
    """Triton chunked banked attention on padded inputs: (q, k, v, r, w, g, S0, z0, eps, C, R)
    with T a multiple of R*C (blocks of C rows, memories saved every R blocks) -> (out, S, z).
    A twelfth argument, the :class:`Launched` of :func:`launch_forward` on the same inputs,
    hands over a forward already launched (``launch_first``)."""

    launches_first = True  # takes a Launched (stand-ins that replace this class in tests do not)

    @staticmethod
    def forward(ctx, q, k, v, r, w, g, S0, z0, eps, C, R, f=None):
        ctx.set_materialize_grads(False)  # unused outputs (S, z) get no zero-filled gradients
        if f is None:
            f = launch_forward(q, k, v, r, w, g, S0, z0, eps, C, R)
        ctx.key, ctx.fast, ctx.meta = f.key, f.fast, f.meta
        ctx.save_for_backward(*f.saved)
        return f.o, f.ST, f.zT

    @staticmethod
    def backward(ctx, do, dST, dzT):
        saved = ctx.saved_tensors  # unpacked once (each access checks versions again)
        key = ctx.key + (None if do is None else do.dtype,)
        L = Launcher(saved[0].device, key,
                     ctx.fast and KERNEL_OPTS["fast_launch"] and aligned(do, dST, dzT)
                     and on_device(saved[0].device, do, dST, dzT))
        return backward(L, KERNEL_OPTS, saved, ctx.meta, do, dST, dzT) + (None,) * 4


def triton_supports(q: Tensor, v: Tensor, chunk: int) -> bool:
    """Whether the kernels take these shapes: D, E, chunk powers of two >= 16, D, E <= 256."""
    def ok(n: int) -> bool:
        return 16 <= n <= 256 and n & (n - 1) == 0
    return HAS_TRITON and ok(q.shape[-1]) and ok(v.shape[-1]) and ok(chunk) and chunk <= 128


def _apply(args: tuple, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """BankedAttentionFn on args; with ``launch_first`` the kernels are launched before autograd
    records the call: its bookkeeping (~10 us of host time on this project's 2-core machine)
    then runs while the GPU works, not before the first kernel (GPU_NOTES "kern, 2026-11-23
    22:15"). ``out``: see :func:`launch_forward` (taken on that path only)."""
    fn = BankedAttentionFn
    if KERNEL_OPTS["launch_first"] and getattr(fn, "launches_first", False):
        return fn.apply(*args, launch_forward(*args, out=out))
    return fn.apply(*args)


# CUDA caps a launch grid's y and z sizes at 65,535. The state kernels' grids put B*H*N on z, the
# others B*H on y or z: a batch of more than 65,535 // (H*N) examples (2,730 for `small`: H=6,
# N=4) failed with "Triton Error [CUDA]: invalid argument" (device call ep-2, chained text
# batches of ~3,500). Such a batch runs as several calls on batch slices, each within the cap.
GRID_YZ_MAX = 65535


def _batch_slices(B: int, H: int, N: int, NT: int) -> list[slice]:
    """Batch slices whose launches stay within :data:`GRID_YZ_MAX` (one slice: the whole batch)."""
    if NT > GRID_YZ_MAX:
        raise ValueError(f"{NT} chunks in a sequence: the kernels launch at most {GRID_YZ_MAX} "
                         "(use a longer chunk or split the sequence)")
    per = max(1, GRID_YZ_MAX // (H * max(N, 1)))
    return [slice(i, min(B, i + per)) for i in range(0, B, per)]


def _apply_sliced(args: tuple, out=None) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_apply` on the whole batch, or on slices of it that fit the grid (outputs joined;
    ``out`` then unused)."""
    q, r, chunk = args[0], args[3], args[9]
    B, H, T = q.shape[:3]
    parts = _batch_slices(B, H, r.shape[-1], T // chunk)
    if len(parts) == 1:
        return _apply(args, out)
    outs = [_apply(tuple(x[sl] if isinstance(x, Tensor) else x for x in args)) for sl in parts]
    return tuple(torch.cat(xs, 0) for xs in zip(*outs))  # type: ignore[return-value]


def banked_attention_triton(q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor,
                            S0: Tensor | None = None, z0: Tensor | None = None,
                            eps: float = 1e-3, chunk: int = 64,
                            out: tuple[Tensor, Tensor] | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Triton path (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``). Same contract as
    :func:`banked_attention_reference`; the output o has v's dtype (use bf16 q, k, v for
    speed). ``out``: tensors (no autograd history) the new S, z may be written into, e.g. the
    slots of a packed state (:func:`launch_forward`); the returned S, z are then those tensors.
    A hint, not a promise (other paths return new tensors): callers that care compare
    addresses, as :class:`~.state_pack.PackInto` does."""
    T = q.shape[2]
    if (S0 is None) != (z0 is None):  # one given: the other starts empty
        if S0 is None:
            S0 = z0.new_zeros(*z0.shape, v.shape[-1])
        else:
            z0 = S0.new_zeros(S0.shape[:-1])
    R = _save_blocks(chunk)
    pad = (-T) % (chunk * R)
    if pad:  # padded steps write nothing (w = 0) and their outputs are dropped
        q, k, v, r, w = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, r, w))
        g = F.pad(g, (0, pad), value=1.0)
    args = (q.contiguous(), k.contiguous(), v.contiguous(), r.contiguous(), w.contiguous(),
            g.contiguous(), S0, z0, float(eps), chunk, R)
    if q.is_cuda and q.device.index != torch.cuda.current_device():  # launches go to the
        with torch.cuda.device(q.device):  # current device: make it q's (a no-op otherwise)
            o, S, z = _apply_sliced(args, out)
    else:  # q's device is current, or CPU tensors (only under TRITON_INTERPRET=1)
        o, S, z = _apply_sliced(args, out)
    return (o[:, :, :T] if pad else o), S, z


def banked_attention(q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor,
                     S0: Tensor | None = None, z0: Tensor | None = None,
                     eps: float = 1e-3, chunk: int = 64,
                     out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Banked attention: the Triton kernels on CUDA where they apply, else the PyTorch reference.
    q, k [B,H,T,D] (feature-mapped), v [B,H,T,E], r, w [B,H,T,N], g [B,H,T], S0 [B,H,N,D,E],
    z0 [B,H,N,D] -> out [B,H,T,E], S, z (fp32). ``out``: see :func:`banked_attention_triton`
    (the reference ignores it)."""
    if q.is_cuda and triton_supports(q, v, chunk):
        return banked_attention_triton(q, k, v, r, w, g, S0, z0, eps, chunk, out)
    o, S, z = banked_attention_reference(q, k, v, r, w, g, S0, z0, eps, chunk)
    return o.to(v.dtype), S, z
