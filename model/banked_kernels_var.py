"""Opt-in variants of the banked-attention kernels (``KERNEL_OPTS``; see
:mod:`blocklm.model.banked_kernels` for the layout). Each computes what the default kernel it
replaces computes; they stay off until a device call times them beside the defaults
(``bench gpu --sweep``) and are turned on by the rule in model/GPU_NOTES.md ("kern,
2026-11-23"): ``fwd_o_lean``, ``bwd_intra_lean``, and ``fwd_o_loop`` (``fwd_o`` over E slices,
measured slower in call 14).
"""

from __future__ import annotations

from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .banked_kernels_bwd import _prep, _rmw

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
        # every per-row bank input in one [C, ZW] tile each, loaded up front (column m: bank
        # m // 2): the bank loops select columns in registers instead of waiting on four small
        # loads per bank (those loops are not pipelined)
        om = tl.arange(0, ZW)
        mz = (om < 2 * N)[None, :]
        ix = bh * T * N + t[:, None] * N + (om // 2)[None, :]
        b_r = tl.load(r + ix, mask=mz, other=0.0).to(tl.float32)
        b_w = tl.load(w + ix, mask=mz, other=0.0).to(tl.float32)
        b_c = tl.load(c + ix, mask=mz, other=0.0)
        b_s = b_r * tl.exp(b_c)  # read weight of the chunk start
        b_z = tl.load(zs + ((bh * NT + j) * N + (om // 2)[None, :]) * D + od[:, None], mask=mz,
                      other=0.0)  # [D, ZW]
        b_q = tl.load(q + bh * T * D + t[:, None] * D + od[None, :])
        b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
        causal = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        for n in range(N):  # the bank mix of the causal scores
            sel = (om == 2 * n)[None, :]
            c_n = tl.sum(tl.where(sel, b_c, 0.0), axis=1)
            M += tl.sum(tl.where(sel, b_r, 0.0), axis=1)[:, None] * tl.sum(
                tl.where(sel, b_w, 0.0), axis=1)[None, :] * tl.exp(
                tl.where(causal, c_n[:, None] - c_n[None, :], float("-inf")))
        A = tl.dot(b_q, tl.trans(b_k)) * M
        dd = tl.sum(A, axis=1)
        num = tl.dot(A.to(v.dtype.element_ty),
                     tl.load(v + bh * T * E + t[:, None] * E + ov[None, :]))  # [C, BV]
        # the normaliser's memory reads for all banks in one small dot: column m of b_z holds
        # bank m // 2's z_start, split into high (even m) and low (odd m) parts in q's dtype, so
        # q . z keeps ~16 bits (q is bf16 already) and no fp32 copy of q is ever formed
        z_hi = b_z.to(q.dtype.element_ty)
        b_z = tl.where((om % 2 == 0)[None, :], z_hi, (b_z - z_hi.to(tl.float32)).to(z_hi.dtype))
        dd += tl.sum(b_s * tl.dot(b_q, b_z), axis=1)
        for n in range(N):  # reads of the chunk-start memories
            s_n = tl.sum(tl.where((om == 2 * n)[None, :], b_s, 0.0), axis=1)  # [C]
            b_hn = tl.load(hs + ((bh * NT + j) * N + n) * D * E + od[:, None] * E + ov[None, :])
            num += s_n[:, None] * tl.dot(b_q, b_hn.to(b_q.dtype))
        dd += eps
        tl.store(o + bh * T * E + t[:, None] * E + ov[None, :],
                 (num / dd[:, None]).to(o.dtype.element_ty))
        if i_v == 0:
            tl.store(den + bh * T + t, dd)

    @triton.jit
    def bwd_intra_lean(q, k, v, r, w, c, do, o, den, dy, dden, dqi, dki, dvi, dr, dw, NT,
                       N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                       C: tl.constexpr, BD: tl.constexpr, PREP: tl.constexpr):
        """``bwd_intra`` at R = 1 (option ``intra_lean``): the same partials of dq, dk, dv and
        intra parts of dr, dw, with the block's r, w, c loaded once as [C, NP] tiles up front
        (the two bank loops select columns in registers instead of waiting on four small loads
        per bank and iteration: those loops are not pipelined) and dr, dw stored once as tiles
        (not 2N row stores)."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        bh = i_bh.to(tl.int64)
        t0 = j * C
        ot = tl.arange(0, C)
        t = t0 + ot
        on = tl.arange(0, NP)
        mk = (on < N)[None, :]
        ix = bh * T * N + t[:, None] * N + on[None, :]
        b_r = tl.load(r + ix, mask=mk, other=0.0).to(tl.float32)  # [C, NP]
        b_w = tl.load(w + ix, mask=mk, other=0.0).to(tl.float32)
        b_c = tl.load(c + ix, mask=mk, other=0.0)
        if PREP:
            _prep(do, o, den, dy, dden, bh * T + t, E=E)
            tl.debug_barrier()  # dy, dden are read back below by other threads
        keep = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        for n in range(N):
            sel = on[None, :] == n
            c_n = tl.sum(tl.where(sel, b_c, 0.0), axis=1)
            M += tl.sum(tl.where(sel, b_r, 0.0), axis=1)[:, None] * tl.sum(
                tl.where(sel, b_w, 0.0), axis=1)[None, :] * tl.exp(
                tl.where(keep, c_n[:, None] - c_n[None, :], float("-inf")))
        p_q = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (t0, 0), (C, D), (1, 0))
        p_k = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (t0, 0), (C, D), (1, 0))
        p_y = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (t0, 0), (C, E), (1, 0))
        p_v = tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1), (t0, 0), (C, E), (1, 0))
        yv = tl.dot(tl.load(p_y), tl.trans(tl.load(p_v)))
        yv += tl.load(dden + bh * T + t)[:, None]  # the normaliser's "ones" value column
        dA = (yv * M).to(q.dtype.element_ty)  # M is 0 above the diagonal
        for i_d in range(D // BD):
            p_x = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (t0, i_d * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dqi + bh * T * D, (T, D), (D, 1), (t0, i_d * BD), (C, BD),
                                   (1, 0)), tl.dot(dA, tl.load(p_x)), False)
            p_x = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (t0, i_d * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dki + bh * T * D, (T, D), (D, 1), (t0, i_d * BD), (C, BD),
                                   (1, 0)), tl.dot(tl.trans(dA), tl.load(p_x)), False)
        qk = tl.dot(tl.load(p_q), tl.trans(tl.load(p_k)))
        A = tl.trans(qk * M).to(dy.dtype.element_ty)
        for i_e in range(E // BD):
            p_x = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (t0, i_e * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dvi + bh * T * E, (T, E), (E, 1), (t0, i_e * BD), (C, BD),
                                   (1, 0)), tl.dot(A, tl.load(p_x)), False)
        Bm = tl.where(keep, qk * yv, 0.0)  # dM
        d_r = tl.zeros([C, NP], dtype=tl.float32)
        d_w = tl.zeros([C, NP], dtype=tl.float32)
        for n in range(N):
            sel = on[None, :] == n
            c_n = tl.sum(tl.where(sel, b_c, 0.0), axis=1)
            BE = Bm * tl.exp(tl.where(keep, c_n[:, None] - c_n[None, :], float("-inf")))
            w_n = tl.sum(tl.where(sel, b_w, 0.0), axis=1)
            r_n = tl.sum(tl.where(sel, b_r, 0.0), axis=1)
            d_r += tl.where(sel, tl.sum(BE * w_n[None, :], axis=1)[:, None], 0.0)
            d_w += tl.where(sel, tl.sum(BE * r_n[:, None], axis=0)[:, None], 0.0)
        tl.store(dr + ix, d_r, mask=mk)
        tl.store(dw + ix, d_w, mask=mk)

    @triton.jit
    def fwd_o_loop(q, k, v, r, w, c, hs, zs, o, den, NT, eps,
                   N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                   C: tl.constexpr, BV: tl.constexpr):
        """fwd_o for all of E in one program, BV columns at a time: the scores A = (q k^T) * M
        and the normaliser are formed once, and only a [C, BV] accumulator is live."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        od = tl.arange(0, D)
        ot = tl.arange(0, C)
        on = tl.arange(0, NP)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        b_q = tl.load(tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (j * C, 0), (C, D),
                                        (1, 0)))
        qk = tl.dot(b_q, tl.trans(tl.load(tl.make_block_ptr(
            k + bh * T * D, (T, D), (D, 1), (j * C, 0), (C, D), (1, 0)))))
        causal = ot[:, None] >= ot[None, :]
        mask = (on < N)[None, :]
        ix = bh * T * N + t[:, None] * N + on[None, :]
        b_rs = tl.load(r + ix, mask=mask, other=0.0).to(tl.float32) * tl.exp(
            tl.load(c + ix, mask=mask, other=0.0))  # [C, NP]: read weight of the chunk start
        M = tl.zeros([C, C], dtype=tl.float32)
        dsum = tl.zeros([C], dtype=tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_c = tl.load(c + rb)
            diff = tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf"))
            M += tl.load(r + rb).to(tl.float32)[:, None] * tl.load(w + rb).to(
                tl.float32)[None, :] * tl.exp(diff)
            b_zn = tl.load(zs + ((bh * NT + j) * N + n) * D + od)
            s_n = tl.sum(tl.where(on[None, :] == n, b_rs, 0.0), axis=1)
            dsum += s_n * tl.sum(b_q.to(tl.float32) * b_zn[None, :], axis=1)
        A = qk * M  # M is 0 above the diagonal
        dd = dsum + tl.sum(A, axis=1) + eps
        tl.store(den + bh * T + t, dd)
        A = A.to(v.dtype.element_ty)
        for i_v in range(E // BV):
            num = tl.dot(A, tl.load(tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1),
                                                      (j * C, i_v * BV), (C, BV), (1, 0))))
            for n in range(N):
                slot = (bh * NT + j) * N + n
                b_hn = tl.load(tl.make_block_ptr(hs + slot * D * E, (D, E), (E, 1),
                                                 (0, i_v * BV), (D, BV), (1, 0)))
                s_n = tl.sum(tl.where(on[None, :] == n, b_rs, 0.0), axis=1)
                num += s_n[:, None] * tl.dot(b_q, b_hn.to(b_q.dtype))
            tl.store(tl.make_block_ptr(o + bh * T * E, (T, E), (E, 1), (j * C, i_v * BV),
                                       (C, BV), (1, 0)), (num / dd[:, None]).to(o.dtype.element_ty))
