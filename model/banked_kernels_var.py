"""Opt-in variants of the banked-attention kernels (``KERNEL_OPTS``; see
:mod:`blocklm.model.banked_kernels` for the layout). Each computes what the default kernel it
replaces computes; they stay off until a device call times them beside the defaults
(``bench gpu --sweep``) and are turned on by the rule in model/GPU_NOTES.md ("kern,
2026-11-23").
"""

from __future__ import annotations

from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def fwd_o_lean(q, k, v, r, w, c, hs, zs, o, den, NT, eps,
                   N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, ZW: tl.constexpr):
        """``fwd_o`` at R = 1 (option ``fwd_o_lean``) with fewer tiles live at once, so that two
        8-warp programs fit an SM (fwd_o: 255 registers, one program per SM, 49% of DRAM
        bandwidth at 16K, call K6): the intra-block part first (the bank mix M, A = (q k^T) M,
        A v: k and v are dead before any memory tile arrives), then the reads of the chunk-start
        memories, and the normaliser's memory part for all banks as one [C, D] x [D, ZW] dot
        (ZW >= 2N columns, a power of two >= 16) instead of a [C, D] fp32 copy of q per bank."""
        i_v, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        T = NT * C
        od = tl.arange(0, D)
        ov = i_v * BV + tl.arange(0, BV)
        ot = tl.arange(0, C)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        causal = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        for n in range(N):  # the bank mix of the causal scores
            rb = bh * T * N + t * N + n
            b_c = tl.load(c + rb)
            M += tl.load(r + rb).to(tl.float32)[:, None] * tl.load(w + rb).to(
                tl.float32)[None, :] * tl.exp(
                tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
        b_q = tl.load(q + bh * T * D + t[:, None] * D + od[None, :])
        A = tl.dot(b_q, tl.trans(tl.load(k + bh * T * D + t[:, None] * D + od[None, :]))) * M
        dd = tl.sum(A, axis=1)
        num = tl.dot(A.to(v.dtype.element_ty),
                     tl.load(v + bh * T * E + t[:, None] * E + ov[None, :]))  # [C, BV]
        # the normaliser's memory reads for all banks in one small dot: column m of Z holds
        # bank m // 2's z_start, split into bf16 high (even m) and low (odd m) parts, so
        # q . z keeps ~16 bits (q is bf16 already) and no fp32 copy of q is ever formed
        om = tl.arange(0, ZW)
        mz = (om < 2 * N)[None, :]
        nb = (om // 2)[None, :]
        b_z = tl.load(zs + ((bh * NT + j) * N + nb) * D + od[:, None], mask=mz, other=0.0)
        z_hi = b_z.to(q.dtype.element_ty)
        b_z = tl.where((om % 2 == 0)[None, :], z_hi, (b_z - z_hi.to(tl.float32)).to(z_hi.dtype))
        ix = bh * T * N + t[:, None] * N + nb  # [C, ZW]: the read weight of the chunk start
        b_s = tl.load(r + ix, mask=mz, other=0.0).to(tl.float32) * tl.exp(
            tl.load(c + ix, mask=mz, other=0.0))
        dd += tl.sum(b_s * tl.dot(b_q, b_z), axis=1)
        for n in range(N):  # reads of the chunk-start memories
            rb = bh * T * N + t * N + n
            s_n = tl.load(r + rb).to(tl.float32) * tl.exp(tl.load(c + rb))  # [C]
            b_hn = tl.load(hs + ((bh * NT + j) * N + n) * D * E + od[:, None] * E + ov[None, :])
            num += s_n[:, None] * tl.dot(b_q, b_hn.to(b_q.dtype))
        dd += eps
        tl.store(o + bh * T * E + t[:, None] * E + ov[None, :],
                 (num / dd[:, None]).to(o.dtype.element_ty))
        if i_v == 0:
            tl.store(den + bh * T + t, dd)
