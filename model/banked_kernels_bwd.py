"""Parallel backward kernels of banked attention (one program per chunk; see
:mod:`blocklm.model.banked_kernels` for the layout and :mod:`blocklm.model.banked_triton` for the
order they run in).

The gradient of q, k, v splits into an intra-chunk part (``bwd_intra``: [C, C] score tiles, the
bank mix M, no memories) and a memory part (``bwd_mem_read``: reads of the chunk-start memory ->
dq, dr; ``bwd_mem_write``: writes into the chunk-end memory -> dk, dw; ``bwd_dv_mem``: dv and
the chunk-end inner products of the decay gradient). Kept apart so that no program holds the [C, C] tiles and a [D, E]
memory with its [C, D] products at once: the fused form needed 255 registers and spilled
(model/GPU_NOTES.md, calls 2-8). The intra kernel writes fp32 partials that the memory kernels
add to before the one bf16 rounding.
"""

from __future__ import annotations

from .banked_kernels import HAS_TRITON, tl, triton  # one optional-import probe for both files

if HAS_TRITON:

    @triton.jit
    def bwd_intra(q, k, v, r, w, c, dy, dden, dqi, dki, dvi, dr, dw, NT,
                  N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                  BD: tl.constexpr):
        """Intra-chunk part of one chunk: fp32 partials of dq, dk, dv; dr, dw initialised with
        their intra-chunk parts (the memory kernels add the rest). Two bank loops (the bank mix
        M first, the per-bank sums of dM = (q k^T)(dy v^T) last, the exps recomputed) so that
        few [C, C] tiles are live at once; [C, D] products BD columns at a time."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        ot = tl.arange(0, C)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        causal = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_c = tl.load(c + rb)
            M += tl.load(r + rb).to(tl.float32)[:, None] * tl.load(w + rb).to(
                tl.float32)[None, :] * tl.exp(
                tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
        p_q = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (j * C, 0), (C, D), (1, 0))
        p_k = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (j * C, 0), (C, D), (1, 0))
        p_y = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (j * C, 0), (C, E), (1, 0))
        p_v = tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1), (j * C, 0), (C, E), (1, 0))
        yv = tl.dot(tl.load(p_y), tl.trans(tl.load(p_v)))
        yv += tl.load(dden + bh * T + t)[:, None]  # the normaliser's "ones" value column
        dA = (yv * M).to(q.dtype.element_ty)  # M is 0 above the diagonal
        for i_d in range(D // BD):
            p_x = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (j * C, i_d * BD), (C, BD),
                                    (1, 0))
            tl.store(tl.make_block_ptr(dqi + bh * T * D, (T, D), (D, 1), (j * C, i_d * BD),
                                       (C, BD), (1, 0)), tl.dot(dA, tl.load(p_x)))
            p_x = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (j * C, i_d * BD), (C, BD),
                                    (1, 0))
            tl.store(tl.make_block_ptr(dki + bh * T * D, (T, D), (D, 1), (j * C, i_d * BD),
                                       (C, BD), (1, 0)), tl.dot(tl.trans(dA), tl.load(p_x)))
        qk = tl.dot(tl.load(p_q), tl.trans(tl.load(p_k)))
        A = tl.trans(qk * M).to(dy.dtype.element_ty)
        for i_e in range(E // BD):
            p_x = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (j * C, i_e * BD), (C, BD),
                                    (1, 0))
            tl.store(tl.make_block_ptr(dvi + bh * T * E, (T, E), (E, 1), (j * C, i_e * BD),
                                       (C, BD), (1, 0)), tl.dot(A, tl.load(p_x)))
        Bm = tl.where(causal, qk * yv, 0.0)  # dM
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_c = tl.load(c + rb)
            BE = Bm * tl.exp(tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
            tl.store(dr + rb, tl.sum(BE * tl.load(w + rb).to(tl.float32)[None, :], axis=1))
            tl.store(dw + rb, tl.sum(BE * tl.load(r + rb).to(tl.float32)[:, None], axis=0))

    @triton.jit
    def bwd_mem_read(q, r, c, hs, zs, dy, dden, dqi, dq, dr, NT,
                     N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                     C: tl.constexpr, BD: tl.constexpr):
        """Reads of the chunk-start memory of one chunk: dq (adds the intra partial, rounds
        once), dr += the reads' part. D in BD-wide slices (outer loop; the per-bank sums stay in
        [C, NP] tiles): BD = D is fastest at D = 128 (model/GPU_NOTES.md, call 13)."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        t = j * C + tl.arange(0, C)
        on = tl.arange(0, NP)
        bh = i_bh.to(tl.int64)
        b_y = tl.load(tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (j * C, 0), (C, E),
                                        (1, 0)))
        b_dd = tl.load(dden + bh * T + t)
        mask = (on < N)[None, :]
        ix = bh * T * N + t[:, None] * N + on[None, :]
        b_rs = tl.load(r + ix, mask=mask, other=0.0).to(tl.float32) * tl.exp(
            tl.load(c + ix, mask=mask, other=0.0))  # [C, NP]: read weight of the chunk start
        d_r = tl.zeros([C, NP], dtype=tl.float32)
        for i_d in range(D // BD):
            od = i_d * BD + tl.arange(0, BD)
            o_x = bh * T * D
            acc = tl.load(tl.make_block_ptr(dqi + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0)))
            b_q = tl.load(tl.make_block_ptr(q + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0))).to(tl.float32)
            for n in range(N):
                slot = (bh * NT + j) * N + n
                b_hn = tl.load(tl.make_block_ptr(hs + slot * D * E, (E, D), (1, E), (0, i_d * BD),
                                                 (E, BD), (0, 1)))  # [E, BD] view of S^T
                b_zn = tl.load(zs + slot * D + od)
                dqt = tl.dot(b_y, b_hn.to(b_y.dtype)) + b_dd[:, None] * b_zn[None, :]  # [C,BD]
                s_n = tl.sum(tl.where(on[None, :] == n, b_rs, 0.0), axis=1)  # [C]
                acc += s_n[:, None] * dqt
                d_r += tl.where(on[None, :] == n, tl.sum(b_q * dqt, axis=1)[:, None], 0.0)
            tl.store(tl.make_block_ptr(dq + o_x, (T, D), (D, 1), (j * C, i_d * BD), (C, BD),
                                       (1, 0)), acc.to(dq.dtype.element_ty))
        # the reads' share of dr: e^c (q . dqt); r e^c / r = e^c, taken from b_rs without dividing
        ec = tl.exp(tl.load(c + ix, mask=mask, other=0.0))
        tl.store(dr + ix, tl.load(dr + ix, mask=mask, other=0.0) + ec * d_r, mask=mask)

    @triton.jit
    def bwd_mem_write(k, v, w, c, dhs, dzs, dki, dk, dw, wd, NT,
                      N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                      C: tl.constexpr, BD: tl.constexpr):
        """Writes into the chunk-end memory of one chunk: dk (adds the intra partial), dw += the
        writes' direct part, per bank sum_s w_s dw_s (for bwd_decay). D in BD-wide slices as in
        bwd_mem_read. (dv from the same tiles here took longer than bwd_dv_mem's extra pass.)"""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        t = j * C + tl.arange(0, C)
        on = tl.arange(0, NP)
        bh = i_bh.to(tl.int64)
        b_v = tl.load(tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1), (j * C, 0), (C, E),
                                        (1, 0)))
        mask = (on < N)[None, :]
        ix = bh * T * N + t[:, None] * N + on[None, :]
        b_cT = tl.load(c + bh * T * N + (j * C + C - 1) * N + on, mask=on < N, other=0.0)
        b_ew = tl.exp(b_cT[None, :] - tl.load(c + ix, mask=mask, other=0.0))  # [C, NP]
        b_ws = tl.load(w + ix, mask=mask, other=0.0).to(tl.float32) * b_ew  # write weight
        d_w = tl.zeros([C, NP], dtype=tl.float32)
        for i_d in range(D // BD):
            od = i_d * BD + tl.arange(0, BD)
            o_x = bh * T * D
            acc = tl.load(tl.make_block_ptr(dki + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0)))
            b_k = tl.load(tl.make_block_ptr(k + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0))).to(tl.float32)
            for n in range(N):
                slot = (bh * NT + j) * N + n
                b_dhn = tl.load(tl.make_block_ptr(dhs + slot * D * E, (E, D), (1, E),
                                                  (0, i_d * BD), (E, BD), (0, 1)))
                dkt = tl.dot(b_v, b_dhn.to(b_v.dtype)) + tl.load(dzs + slot * D + od)[None, :]
                s_n = tl.sum(tl.where(on[None, :] == n, b_ws, 0.0), axis=1)[:, None]
                acc += s_n * dkt
                d_w += tl.where(on[None, :] == n, tl.sum(b_k * dkt, axis=1)[:, None], 0.0)
            tl.store(tl.make_block_ptr(dk + o_x, (T, D), (D, 1), (j * C, i_d * BD), (C, BD),
                                       (1, 0)), acc.to(dk.dtype.element_ty))
        dwi = b_ew * d_w
        tl.store(dw + ix, tl.load(dw + ix, mask=mask, other=0.0) + dwi, mask=mask)
        b_w = tl.load(w + ix, mask=mask, other=0.0).to(tl.float32)
        tl.store(wd + (bh * NT + j) * N + on, tl.sum(b_w * dwi, axis=0), mask=on < N)

    @triton.jit
    def bwd_dv_mem(k, w, c, hs, zs, dhs, dzs, dvi, dv, hd, NT,
                   N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                   BV: tl.constexpr, HDOT: tl.constexpr, BR: tl.constexpr):
        """dv of one chunk and E-tile: the intra partial + the writes' share of the chunk-end
        memory gradient. With HDOT (only when BV = E: one program sees the whole [D, E] tile)
        also <dS_end, S_start> + <dz_end, z_start> per bank, for bwd_decay: this kernel has
        registers to spare and already streams dS_end, so bwd_hdot's pass is only S_start."""
        i_v, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        T = NT * C
        od = tl.arange(0, D)
        ov = i_v * BV + tl.arange(0, BV)
        t = j * C + tl.arange(0, C)
        bh = i_bh.to(tl.int64)
        b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
        acc = tl.load(dvi + bh * T * E + t[:, None] * E + ov[None, :])
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_w = tl.load(w + rb).to(tl.float32)
            b_c = tl.load(c + rb)
            b_cT = tl.load(c + bh * T * N + (j * C + C - 1) * N + n)
            slot = (bh * NT + j) * N + n
            b_dhn = tl.load(dhs + slot * D * E + od[:, None] * E + ov[None, :])
            acc += (b_w * tl.exp(b_cT - b_c))[:, None] * tl.dot(b_k, b_dhn.to(b_k.dtype))
            if HDOT:  # in row slices: two whole fp32 [D, E] tiles would spill
                part = tl.zeros([BR, E], dtype=tl.float32)
                for d0 in range(0, D, BR):
                    ix = slot * D * E + (d0 + tl.arange(0, BR))[:, None] * E + ov[None, :]
                    part += tl.load(hs + ix).to(tl.float32) * tl.load(dhs + ix).to(tl.float32)
                tl.store(hd + slot, tl.sum(tl.sum(part, axis=1), axis=0) + tl.sum(
                    tl.load(zs + slot * D + od) * tl.load(dzs + slot * D + od), axis=0))
        tl.store(dv + bh * T * E + t[:, None] * E + ov[None, :], acc.to(dv.dtype.element_ty))
