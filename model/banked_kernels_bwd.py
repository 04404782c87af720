"""Parallel backward kernels of banked attention (one program per chunk; see
:mod:`blocklm.model.banked_kernels` for the layout and :mod:`blocklm.model.banked_triton` for the
order they run in).

The gradient of q, k, v splits into an intra-chunk part (``bwd_intra``: [C, C] score tiles, the
bank mix M, no memories) and a memory part (``bwd_mem_read``: reads of the chunk-start memory ->
dq, dr; ``bwd_mem_write``: writes into the chunk-end memory -> dk, dw; ``bwd_dv_mem``: dv and
the chunk-end inner products of the decay gradient). Kept apart so that no program holds the [C, C] tiles and a [D, E]
memory with its [C, D] products at once: the fused form needed 255 registers and spilled
(model/GPU_NOTES.md, calls 2-8). The intra kernel (which also splits the output gradient: it runs first) writes partials (fp32,
or bf16 with ``low_partials``) that the memory kernels add to in fp32 before rounding.
"""

from __future__ import annotations

from .banked_kernels import HAS_TRITON, tl, triton  # one optional-import probe for both files

if HAS_TRITON:

    @triton.jit
    def _rmw(ptr, val, ACC: tl.constexpr):
        """Store val in ptr's dtype, or add it to what is there (ACC: a later tile of the same
        rows)."""
        if ACC:
            val += tl.load(ptr).to(tl.float32)
        tl.store(ptr, val.to(ptr.dtype.element_ty))

    @triton.jit
    def _intra_tile(q, k, v, r, w, c, dy, dden, dqi, dki, dvi, dr, dw, bh, T, tr, ts,
                    N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                    BD: tl.constexpr, DIAG: tl.constexpr, ACC: tl.constexpr):
        """One [C, C] score tile, rows from tr, columns from ts (DIAG: the same block, causal
        mask; else an earlier block of the save span, unmasked): its shares of dq, dr (rows)
        and dk, dv, dw (columns). Two bank loops (the bank mix M first, the per-bank sums of
        dM = (q k^T)(dy v^T) last, the exps recomputed) so that few [C, C] tiles are live at
        once; [C, D] products BD columns at a time."""
        ot = tl.arange(0, C)
        t = tr + ot
        s = ts + ot
        if DIAG:
            keep = ot[:, None] >= ot[None, :]
        else:
            keep = (ot[:, None] >= 0) & (ot[None, :] >= 0)
        M = tl.zeros([C, C], dtype=tl.float32)
        for n in range(N):
            b_ct = tl.load(c + bh * T * N + t * N + n)
            b_cs = tl.load(c + bh * T * N + s * N + n)
            M += tl.load(r + bh * T * N + t * N + n).to(tl.float32)[:, None] * tl.load(
                w + bh * T * N + s * N + n).to(tl.float32)[None, :] * tl.exp(
                tl.where(keep, b_ct[:, None] - b_cs[None, :], float("-inf")))
        p_q = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (tr, 0), (C, D), (1, 0))
        p_k = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (ts, 0), (C, D), (1, 0))
        p_y = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (tr, 0), (C, E), (1, 0))
        p_v = tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1), (ts, 0), (C, E), (1, 0))
        yv = tl.dot(tl.load(p_y), tl.trans(tl.load(p_v)))
        yv += tl.load(dden + bh * T + t)[:, None]  # the normaliser's "ones" value column
        dA = (yv * M).to(q.dtype.element_ty)  # M is 0 above the diagonal
        for i_d in range(D // BD):
            p_x = tl.make_block_ptr(k + bh * T * D, (T, D), (D, 1), (ts, i_d * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dqi + bh * T * D, (T, D), (D, 1), (tr, i_d * BD), (C, BD),
                                   (1, 0)), tl.dot(dA, tl.load(p_x)), ACC)
            p_x = tl.make_block_ptr(q + bh * T * D, (T, D), (D, 1), (tr, i_d * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dki + bh * T * D, (T, D), (D, 1), (ts, i_d * BD), (C, BD),
                                   (1, 0)), tl.dot(tl.trans(dA), tl.load(p_x)), ACC)
        qk = tl.dot(tl.load(p_q), tl.trans(tl.load(p_k)))
        A = tl.trans(qk * M).to(dy.dtype.element_ty)
        for i_e in range(E // BD):
            p_x = tl.make_block_ptr(dy + bh * T * E, (T, E), (E, 1), (tr, i_e * BD), (C, BD),
                                    (1, 0))
            _rmw(tl.make_block_ptr(dvi + bh * T * E, (T, E), (E, 1), (ts, i_e * BD), (C, BD),
                                   (1, 0)), tl.dot(A, tl.load(p_x)), ACC)
        Bm = tl.where(keep, qk * yv, 0.0)  # dM
        for n in range(N):
            b_ct = tl.load(c + bh * T * N + t * N + n)
            b_cs = tl.load(c + bh * T * N + s * N + n)
            BE = Bm * tl.exp(tl.where(keep, b_ct[:, None] - b_cs[None, :], float("-inf")))
            _rmw(dr + bh * T * N + t * N + n,
                 tl.sum(BE * tl.load(w + bh * T * N + s * N + n).to(tl.float32)[None, :], axis=1),
                 ACC)
            _rmw(dw + bh * T * N + s * N + n,
                 tl.sum(BE * tl.load(r + bh * T * N + t * N + n).to(tl.float32)[:, None], axis=0),
                 ACC)

    @triton.jit
    def _prep(do, o, den, dy, dden, t, E: tl.constexpr):
        """out = num / den: dy = do / den (numerator), dden = -(do . out) / den (normaliser)
        of the rows t."""
        oe = tl.arange(0, E)
        b_do = tl.load(do + t[:, None] * E + oe[None, :]).to(tl.float32)
        b_den = tl.load(den + t)
        tl.store(dy + t[:, None] * E + oe[None, :], (b_do / b_den[:, None]).to(
            dy.dtype.element_ty))
        b_o = tl.load(o + t[:, None] * E + oe[None, :]).to(tl.float32)
        tl.store(dden + t, -tl.sum(b_do * b_o, axis=1) / b_den)

    @triton.jit
    def bwd_prep(do, o, den, dy, dden, E: tl.constexpr, C: tl.constexpr):
        """The output-gradient split of one block, as its own launch (``prep_in_intra`` off)."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        _prep(do, o, den, dy, dden,
              i_bh.to(tl.int64) * tl.num_programs(0) * C + j * C + tl.arange(0, C), E=E)

    @triton.jit
    def bwd_intra(q, k, v, r, w, c, do, o, den, dy, dden, dqi, dki, dvi, dr, dw, NT,
                  N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                  BD: tl.constexpr, R: tl.constexpr, PREP: tl.constexpr):
        """Intra-span part of one save span of R (1 or 2) blocks: with PREP first the split of
        the output gradient (``_prep``; stored for the later kernels: one launch fewer), then
        fp32 partials of dq, dk, dv; dr, dw initialised with their intra parts (the memory
        kernels add the rest). With R = 2 the diagonal tiles store first, then the off-diagonal
        tile adds to both blocks' rows. Barriers: each phase reads what other threads of the
        program stored."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        bh = i_bh.to(tl.int64)
        t0 = j * R * C
        if PREP:
            for i in range(R):
                _prep(do, o, den, dy, dden, bh * T + t0 + i * C + tl.arange(0, C), E=E)
            tl.debug_barrier()
        _intra_tile(q, k, v, r, w, c, dy, dden, dqi, dki, dvi, dr, dw, bh, T, t0, t0,
                    N=N, D=D, E=E, C=C, BD=BD, DIAG=True, ACC=False)
        if R == 2:
            _intra_tile(q, k, v, r, w, c, dy, dden, dqi, dki, dvi, dr, dw, bh, T, t0 + C,
                        t0 + C, N=N, D=D, E=E, C=C, BD=BD, DIAG=True, ACC=False)
            tl.debug_barrier()
            _intra_tile(q, k, v, r, w, c, dy, dden, dqi, dki, dvi, dr, dw, bh, T, t0 + C, t0,
                        N=N, D=D, E=E, C=C, BD=BD, DIAG=False, ACC=True)

    @triton.jit
    def bwd_mem_read(q, r, c, hs, zs, dy, dden, dqi, dq, dr, NT,
                     N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                     C: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
        """Reads of the chunk-start memory of one chunk: dq (adds the intra partial, rounds
        once), dr += the reads' part. D in BD-wide slices (outer loop; the per-bank sums stay in
        [C, NP] tiles): BD = D is fastest at D = 128 (model/GPU_NOTES.md, call 13)."""
        _mem_read(q, r, c, hs, zs, dy, dden, dqi, dq, dr, tl.program_id(0), tl.program_id(1),
                  NT, N=N, NP=NP, D=D, E=E, C=C, BD=BD, R=R)

    @triton.jit
    def _mem_read(q, r, c, hs, zs, dy, dden, dqi, dq, dr, j, i_bh, NT,
                  N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                  C: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
        """``bwd_mem_read`` of chunk j and batch*head i_bh (also a path of ``bwd_mem_all``)."""
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
                                            (C, BD), (1, 0))).to(tl.float32)
            b_q = tl.load(tl.make_block_ptr(q + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0))).to(tl.float32)
            for n in range(N):
                slot = (bh * (NT // R) + j // R) * N + n  # the span-start memory
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
                      C: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
        """Writes into the chunk-end memory of one chunk: dk (adds the intra partial), dw += the
        writes' direct part, per bank sum_s w_s dw_s (for bwd_decay). D in BD-wide slices as in
        bwd_mem_read. (dv from the same tiles here took longer than bwd_dv_mem's extra pass.)"""
        _mem_write(k, v, w, c, dhs, dzs, dki, dk, dw, wd, tl.program_id(0), tl.program_id(1),
                   NT, N=N, NP=NP, D=D, E=E, C=C, BD=BD, R=R)

    @triton.jit
    def _mem_write(k, v, w, c, dhs, dzs, dki, dk, dw, wd, j, i_bh, NT,
                   N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                   C: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
        """``bwd_mem_write`` of chunk j and batch*head i_bh (also a path of ``bwd_mem_all``)."""
        T = NT * C
        t = j * C + tl.arange(0, C)
        on = tl.arange(0, NP)
        bh = i_bh.to(tl.int64)
        b_v = tl.load(tl.make_block_ptr(v + bh * T * E, (T, E), (E, 1), (j * C, 0), (C, E),
                                        (1, 0)))
        mask = (on < N)[None, :]
        ix = bh * T * N + t[:, None] * N + on[None, :]
        t_end = (j - j % R + R) * C - 1  # last row of the save span
        b_cT = tl.load(c + bh * T * N + t_end * N + on, mask=on < N, other=0.0)
        b_ew = tl.exp(b_cT[None, :] - tl.load(c + ix, mask=mask, other=0.0))  # [C, NP]
        b_ws = tl.load(w + ix, mask=mask, other=0.0).to(tl.float32) * b_ew  # write weight
        d_w = tl.zeros([C, NP], dtype=tl.float32)
        for i_d in range(D // BD):
            od = i_d * BD + tl.arange(0, BD)
            o_x = bh * T * D
            acc = tl.load(tl.make_block_ptr(dki + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0))).to(tl.float32)
            b_k = tl.load(tl.make_block_ptr(k + o_x, (T, D), (D, 1), (j * C, i_d * BD),
                                            (C, BD), (1, 0))).to(tl.float32)
            for n in range(N):
                slot = (bh * (NT // R) + j // R) * N + n  # the span-end memory gradient
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
                   BV: tl.constexpr, HDOT: tl.constexpr, BR: tl.constexpr, R: tl.constexpr):
        """dv of one chunk and E-tile: the intra partial + the writes' share of the chunk-end
        memory gradient. With HDOT (only when BV = E: one program sees the whole [D, E] tile)
        also <dS_end, S_start> + <dz_end, z_start> per bank, for bwd_decay: this kernel has
        registers to spare and already streams dS_end, so bwd_hdot's pass is only S_start."""
        _dv_mem(k, w, c, hs, zs, dhs, dzs, dvi, dv, hd, tl.program_id(0), tl.program_id(1),
                tl.program_id(2), NT, N=N, D=D, E=E, C=C, BV=BV, HDOT=HDOT, BR=BR, R=R)

    @triton.jit
    def _dv_mem(k, w, c, hs, zs, dhs, dzs, dvi, dv, hd, i_v, j, i_bh, NT,
                N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                BV: tl.constexpr, HDOT: tl.constexpr, BR: tl.constexpr, R: tl.constexpr):
        """``bwd_dv_mem`` of E-tile i_v, chunk j, batch*head i_bh (also a path of
        ``bwd_mem_all``)."""
        T = NT * C
        od = tl.arange(0, D)
        ov = i_v * BV + tl.arange(0, BV)
        t = j * C + tl.arange(0, C)
        bh = i_bh.to(tl.int64)
        b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
        acc = tl.load(dvi + bh * T * E + t[:, None] * E + ov[None, :]).to(tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_w = tl.load(w + rb).to(tl.float32)
            b_c = tl.load(c + rb)
            b_cT = tl.load(c + bh * T * N + ((j - j % R + R) * C - 1) * N + n)
            slot = (bh * (NT // R) + j // R) * N + n  # span-end gradient, span-start memory
            b_dhn = tl.load(dhs + slot * D * E + od[:, None] * E + ov[None, :])
            acc += (b_w * tl.exp(b_cT - b_c))[:, None] * tl.dot(b_k, b_dhn.to(b_k.dtype))
            if HDOT:  # in row slices: two whole fp32 [D, E] tiles would spill; block j % R
                # of the span takes rows [j % R, j % R + 1) * D / R (one partial per block)
                part = tl.zeros([BR, E], dtype=tl.float32)
                for d0 in range((j % R) * (D // R), (j % R + 1) * (D // R), BR):
                    ix = slot * D * E + (d0 + tl.arange(0, BR))[:, None] * E + ov[None, :]
                    part += tl.load(hs + ix).to(tl.float32) * tl.load(dhs + ix).to(tl.float32)
                oh = (j % R) * (D // R) + tl.arange(0, D // R)
                tl.store(hd + (bh * NT + j) * N + n, tl.sum(tl.sum(part, axis=1), axis=0) + tl.sum(
                    tl.load(zs + slot * D + oh) * tl.load(dzs + slot * D + oh), axis=0))
        tl.store(dv + bh * T * E + t[:, None] * E + ov[None, :], acc.to(dv.dtype.element_ty))
