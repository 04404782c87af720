"""Launch sequence of the banked-attention backward (see :mod:`blocklm.model.banked_triton` for
the function and :mod:`blocklm.model.banked_kernels` for the layout), and the tile choices the
forward shares: ``bwd_intra`` (it may also split the output gradient) writes partials of dq, dk,
dv (fp32, or the inputs' dtype with ``low_partials``) and initialises dr, dw; ``bwd_dh`` carries
the memory gradient backwards across spans; ``bwd_mem_read``, ``bwd_mem_write`` and
``bwd_dv_mem`` (:mod:`blocklm.model.banked_kernels_bwd`) add the memory parts and round once;
``bwd_decay`` turns the log-decay gradient into those of w and g.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import banked_kernels as K
from .banked_kernels import HAS_TRITON

if HAS_TRITON:
    from . import banked_kernels_bwd as KB
    from . import banked_kernels_mem as KM
    from . import banked_kernels_var as KV


def pow2(n: int) -> int:
    """Smallest power of two >= n."""
    return 1 << (n - 1).bit_length()


def tiles(opt: dict, BHN: int, NT: int, D: int, E: int) -> tuple[int, int, int]:
    """D- and E-tiles of the state kernels, E-tile of the output and dv kernels."""
    th, tv = opt["tile_h"], opt["tile_v"]
    if th is None:  # few chunks: parallelism over state tiles may pay more than bigger steps
        big = BHN * max(1, D // 128) * max(1, E // 128) >= 128 and NT > opt["short"]
        th = 128 if big else 64
    bk, bv = opt["tile_hk"] or th, opt["tile_hv"] or th
    return min(D, bk), min(E, bv), min(E, tv)


def ispec(n: int) -> tuple[bool, bool]:
    """How Triton specialises an integer argument (== 1, divisible by 16): part of a launch key."""
    return n == 1, n % 16 == 0


def batch_rows(x: Tensor) -> Tensor:
    """x [B, ...] detached, fp32, each batch row contiguous: x itself when it already is (a
    slice of the packed per-example states, rows a state apart: the state kernels take the
    row stride, so the slice is not copied), else a contiguous fp32 copy. The copies were
    a full pass over each layer's incoming memory forward and its gradient backward (device
    call P83: 96 copies of [1024, 6, 4, 64, 64] in 3 mixed steps, 29.5 ms forward alone)."""
    x = x.detach()
    if x.dtype != torch.float32:
        return x.float().contiguous()
    return x if rows_contiguous(x) else x.contiguous()


def rows_contiguous(x: Tensor) -> bool:
    """Whether each of x's batch rows (dim 0) is contiguous inside: what the state kernels
    need of an incoming or outgoing memory, whatever the row stride."""
    step = 1
    for size, stride in zip(reversed(x.shape[1:]), reversed(x.stride()[1:])):
        if size != 1 and stride != step:
            return False
        step *= size
    return True


def backward(L, opt: dict, saved, meta, do, dST, dzT):
    """Gradients of (q, k, v, r, w, g, S0, z0) from those of (out, S, z); L launches (a
    :class:`blocklm.model.banked_launch.Launcher`); do, dST, dzT may be None (not used)."""
    q, k, v, r, w, g, c, hs, zs, o, den = saved
    has_s0, C, R = meta
    B, H, T, D = q.shape
    NT = T // C
    do = do.contiguous() if do is not None else torch.zeros_like(o)
    dy = torch.empty_like(v)
    dden = torch.empty_like(den)
    prep = opt["prep_in_intra"]
    prep = T <= 2048 if prep is None else prep
    if not prep:  # launched first: the GPU waits for the backward's first kernel while the
        # host is behind (~0.05 ms at 4K tokens, GPU_NOTES call L5); the rest is set up after
        L(KB.bwd_prep, (NT, B * H), do, o, den, dy, dden, E=v.shape[-1], C=C)
    E, N = v.shape[-1], r.shape[-1]
    NS, CS = T // (C * R), C * R
    BK, BV, BO = tiles(opt, B * H * N, NS, D, E)
    dev = q.device
    f32 = torch.float32
    dr = torch.empty(B, H, T, N, device=dev, dtype=f32)
    dw = torch.empty_like(dr)
    BM = min(D, opt["tile_dm"])
    warps = opt["warps_mem"] if D * E >= 8192 else 4
    # intra-span parts first (with dy, dden; dr, dw initialised), then the memory gradient
    # across spans, then the memory parts
    pdt = q.dtype if opt["low_partials"] else f32  # one more rounding, half the bytes
    dqi = torch.empty(B, H, T, D, device=dev, dtype=pdt)
    dki = torch.empty_like(dqi)
    dvi = torch.empty(B, H, T, E, device=dev, dtype=pdt)
    if opt["intra_lean"] and R == 1:  # opt-in (banked_kernels_var.py)
        L(KV.bwd_intra_lean, (NS, B * H), q, k, v, r, w, c, do, o, den, dy, dden, dqi, dki, dvi,
          dr, dw, NT, N=N, NP=pow2(N), D=D, E=E, C=C, BD=min(D, E, opt["tile_dm"]), PREP=prep,
          num_warps=opt["warps_intra"])
    else:
        L(KB.bwd_intra, (NS, B * H), q, k, v, r, w, c, do, o, den, dy, dden, dqi, dki, dvi, dr,
          dw, NT, N=N, D=D, E=E, C=C, BD=min(D, E, opt["tile_dm"]), R=R, PREP=prep,
          num_warps=opt["warps_intra"])
    # dq, dk, dv only after that launch (the memory parts write them): bwd_prep's 0.06 ms at
    # 4K is all the host has to reach bwd_intra (call kern9-3, profiled: 53 us late)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    has_dst = dST is not None or dzT is not None
    dhs = torch.empty_like(hs)
    dzs = torch.empty_like(zs)
    if has_s0:
        dS0 = torch.empty(B, H, N, D, E, device=dev, dtype=f32)
        dz0 = torch.empty(B, H, N, D, device=dev, dtype=f32)
    else:  # not written (HAS_S0=False): no allocations (host time at 1K)
        dS0, dz0 = dhs, dzs
    if has_dst:
        dST = batch_rows(dST if dST is not None else q.new_zeros(B, H, N, D, E, dtype=f32))
        dzT = batch_rows(dzT if dzT is not None else q.new_zeros(B, H, N, D, dtype=f32))
    else:  # not read (HAS_DST=False): no zero tensors to fill
        dST, dzT = dhs, dzs
    sST, szT = dST.stride(0), dzT.stride(0)
    in_dh = int(opt["hdot_in_dh"] or 0)  # the decay's inner products in bwd_dh (row partials
    # hp); 1: an elementwise product, 2: the diagonal of a dot (its operand is prefetched)
    HP = E // BV + 1 if in_dh else 0  # rows of D partials per span and bank
    hp = torch.empty(B * H * NS * N * HP * D, device=dev, dtype=f32) if in_dh else dzs
    # the row strides' specialisations join the launch key (they vary with the caller)
    Lh = L.extended((ispec(sST), ispec(szT), ispec(H * N)))
    Lh(K.bwd_dh, (D // BK, E // BV, B * H * N), q, r, c, dy, dden, dhs, dzs, dST, dzT, dS0,
       dz0, hs, zs, hp, NS, sST, szT, H * N, N=N, D=D, E=E, C=CS, BK=BK, BV=BV,
       HAS_DST=has_dst, HAS_S0=has_s0, HDOT=in_dh, PF=opt["prefetch_dh"],
       num_warps=opt["warps_h"], num_stages=opt["stages_h"], maxnreg=opt["maxnreg_h"])
    hdot = opt["hdot_in_dv"] and BO == E and not in_dh  # one program per whole [D, E] tile
    # per-block partials of the span-end inner products (bwd_hdot fills one per span)
    hd = (torch.empty if hdot or in_dh or R == 1 else torch.zeros)(B * H * NT * N, device=dev,
                                                                    dtype=f32)
    wd = torch.empty_like(hd)
    BR = max(1, min(D // R, opt["hdot_rows"] or 2048 // E))
    # the memory parts as one launch of interleaved paths (banked_kernels_mem.py), dv in nv
    # E-tiles of at least 16 columns (a dot's smallest side on the GPU)
    nv = min(int(opt["mem_fuse"] or 0), E // 16) if E >= 16 else int(opt["mem_fuse"] or 0)
    if nv and R == 1 and not in_dh and E % nv == 0:
        L(KM.bwd_mem_all, (3 + nv, NT, B * H), q, k, v, r, w, c, hs, zs, dhs, dzs, dy, dden,
          dqi, dki, dvi, dq, dk, dv, dr, dw, wd, hd, NT, N=N, NP=pow2(N), D=D, E=E, C=C,
          BD=min(D, opt["tile_dmf"] or BM), BV=E // nv,
          BH=max(1, min(D, opt["tile_hdf"] or 4096 // E)), HW=int(opt["hdot_mf"] or 0),
          num_warps=warps, num_stages=opt["stages_mem"], maxnreg=opt["maxnreg_mem"])
        hdot = True  # hd is filled
    else:
        L(KB.bwd_mem_read, (NT, B * H), q, r, c, hs, zs, dy, dden, dqi, dq, dr, NT, N=N,
          NP=pow2(N), D=D, E=E, C=C, BD=BM, R=R, num_warps=warps, num_stages=opt["stages_mem"])
        L(KB.bwd_mem_write, (NT, B * H), k, v, w, c, dhs, dzs, dki, dk, dw, wd, NT, N=N,
          NP=pow2(N), D=D, E=E, C=C, BD=BM, R=R, num_warps=warps, num_stages=opt["stages_mem"])
        L(KB.bwd_dv_mem, (E // BO, NT, B * H), k, w, c, hs, zs, dhs, dzs, dvi, dv, hd, NT,
          N=N, D=D, E=E, C=C, BV=BO, HDOT=hdot, BR=BR, R=R, num_warps=opt["warps_dv"],
          num_stages=opt["stages_dv"])
    if not hdot and not in_dh:
        L(K.bwd_hdot, (B * H * NS * N,), hs, zs, dhs, dzs, hd, N=N, D=D, E=E,
          BD=min(D, 8192 // E), R=R)
    dg = torch.empty(B, H, T, device=dev, dtype=f32)
    L(K.bwd_decay, (NS, B * H), r, w, g, c, dr, dw, dg, hd, wd, hp, N=N, NP=pow2(N), C=CS, R=R,
      HP=HP, HD=D)
    return (dq, dk, dv, dr.to(r.dtype), dw.to(w.dtype), dg.to(g.dtype),
            dS0 if has_s0 else None, dz0 if has_s0 else None)
