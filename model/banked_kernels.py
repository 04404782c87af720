"""Triton kernels of banked, write-decayed causal linear attention (see
:mod:`blocklm.model.banked_triton` for the function, the layout and the autograd wrapper).

All kernels take contiguous [B*H, T, ...] tensors. Rows are processed in blocks of C; memories
are saved once per span of R blocks (R = 1 or 2, T a multiple of R*C); c is the span-local
inclusive cumsum of log a (``decay_prep``). Saved span-start memories ``hs`` [B*H, T/(RC), N, D,
E] (input dtype) and normalisers ``zs`` [B*H, T/(RC), N, D] (fp32); their gradients ``dhs``/``dzs``
are those at each span's end. bf16 matmul operands, fp32 accumulation; every exp is of a
non-positive in-span difference.

Forward: ``fwd_h`` (memory across spans, one program per bank and state tile), ``fwd_o``
(outputs of all blocks in parallel; opt-in variants in :mod:`blocklm.model.banked_kernels_var`).
Backward: the intra-span kernel of :mod:`blocklm.model.banked_kernels_bwd` (it also splits the
output gradient), ``bwd_dh`` (memory gradient backwards across spans), the parallel
memory-gradient kernels (dq, dk, dv, dr, dw),
``bwd_hdot`` (<dS_end, S_start> per span and bank, unless ``bwd_dv_mem`` does it) and
``bwd_decay`` (gradient of the log-decays within each span, then of w and g).
"""

from __future__ import annotations

try:  # optional: CPU machines (and CI) have no triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False


if HAS_TRITON:

    @triton.jit
    def decay_prep(w, g, c, N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr):
        """c = chunk-local inclusive cumsum of log a = log1p(-w (1 - g)), one chunk [C, N]."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        t = i_bh.to(tl.int64) * tl.num_programs(0) * C + j * C + tl.arange(0, C)
        on = tl.arange(0, NP)
        m = (on < N)[None, :]
        b_w = tl.load(w + t[:, None] * N + on[None, :], mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(g + t).to(tl.float32)
        x = -b_w * (1.0 - b_g[:, None])
        u = 1.0 + x
        la = tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))  # log1p
        tl.store(c + t[:, None] * N + on[None, :], tl.cumsum(la, 0), mask=m)

    @triton.jit
    def bwd_hdot(hs, zs, dhs, dzs, hd, N: tl.constexpr, D: tl.constexpr, E: tl.constexpr,
                 BD: tl.constexpr, R: tl.constexpr):
        """<dS_end, S_start> + <dz_end, z_start> of one (batch*head, span, bank) slot, stored
        as the first block's partial (hd has R per span, the others zero)."""
        slot = tl.program_id(0).to(tl.int64)
        tot = slot_hdot(hs, zs, dhs, dzs, slot, D=D, E=E, BD=BD)
        tl.store(hd + ((slot // N) * R) * N + slot % N, tot)

    @triton.jit
    def slot_hdot(hs, zs, dhs, dzs, slot, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr):
        """<dS_end, S_start> + <dz_end, z_start> of saved-memory slot ``slot`` (int64), the
        [D, E] product in BD-row steps (also the fused launch's unpipelined path)."""
        oe = tl.arange(0, E)
        acc = tl.zeros([BD, E], dtype=tl.float32)
        for d0 in range(0, D, BD):
            ix = slot * D * E + (d0 + tl.arange(0, BD))[:, None] * E + oe[None, :]
            acc += tl.load(dhs + ix).to(tl.float32) * tl.load(hs + ix).to(tl.float32)
        od = tl.arange(0, D)
        tot = tl.sum(tl.sum(acc, axis=1), axis=0)
        return tot + tl.sum(tl.load(dzs + slot * D + od) * tl.load(zs + slot * D + od), axis=0)

    @triton.jit
    def bwd_decay(r, w, g, c, dr, dw, dg, hd, wd, hp, N: tl.constexpr, NP: tl.constexpr,
                   C: tl.constexpr, R: tl.constexpr, HP: tl.constexpr = 0,
                   HD: tl.constexpr = 16):
        """Gradient of the log-decays of one chunk: dc = r dr - w dw, plus at the chunk's last
        step d/dc_T of the chunk-end memory, <dS_end, S_end> = e^cT <dS_end, S_start> + sum_s
        w_s dw_s (writes' part); d log a = reverse cumsum of dc within the chunk, then to w, g.
        Inner products rather than a sequence-long cumsum of dc: that one cancels badly.
        C here is the save span (R blocks): hd and wd hold one partial per block; with HP > 0
        the <dS_end, S_start> partials are HP rows of HD per span and bank in hp (bwd_dh's
        HDOT), hd unused."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        NT = tl.num_programs(0)
        t = i_bh.to(tl.int64) * NT * C + j * C + tl.arange(0, C)
        on = tl.arange(0, NP)
        m = (on < N)[None, :]
        ix = t[:, None] * N + on[None, :]
        b_r = tl.load(r + ix, mask=m, other=0.0).to(tl.float32)
        b_w = tl.load(w + ix, mask=m, other=0.0).to(tl.float32)
        b_dw = tl.load(dw + ix, mask=m, other=0.0)
        b_g = tl.load(g + t).to(tl.float32)
        b_cT = tl.load(c + (i_bh.to(tl.int64) * NT * C + j * C + C - 1) * N + on, mask=on < N,
                       other=0.0)
        h_dot = tl.zeros([NP], dtype=tl.float32)
        w_dot = tl.zeros([NP], dtype=tl.float32)
        for p in range(R):
            slot = ((i_bh.to(tl.int64) * NT + j) * R + p) * N + on
            if HP == 0:
                h_dot += tl.load(hd + slot, mask=on < N, other=0.0)
            w_dot += tl.load(wd + slot, mask=on < N, other=0.0)
        for p in range(HP):  # rows of D partials per span and bank
            ixp = ((i_bh.to(tl.int64) * NT + j) * N + on)[:, None] * HP + p
            h_dot += tl.sum(tl.load(hp + ixp * HD + tl.arange(0, HD)[None, :],
                                    mask=(on < N)[:, None], other=0.0), axis=1)
        last = tl.exp(b_cT) * h_dot + w_dot
        dc = b_r * tl.load(dr + ix, mask=m, other=0.0) - b_w * b_dw
        dc += tl.where((tl.arange(0, C) == C - 1)[:, None], last[None, :], 0.0)
        dla = tl.cumsum(dc, 0, reverse=True)
        a = 1.0 - b_w * (1.0 - b_g[:, None])
        tl.store(dw + ix, b_dw - dla * (1.0 - b_g[:, None]) / a, mask=m)
        tl.store(dg + t, tl.sum(dla * b_w / a, 1))

    @triton.jit
    def fwd_h(k, v, w, c, hs, zs, S0, z0, ST, zT, NT, sS0, sz0, sST, szT, HN,
               N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        """Memory across chunks for one (batch*head, bank, D-tile, E-tile); saves chunk starts.
        S0, z0, ST, zT: each batch row contiguous, rows sS0 / sz0 / sST / szT elements apart
        (HN = H*N banks a row): the incoming memories are read where they lie in the packed
        states, and the outgoing ones written where the packed state keeps them."""
        i_k, i_v, i_bhn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_b, i_hn = (i_bhn // HN).to(tl.int64), i_bhn % HN
        i_bh, n = i_bhn // N, i_bhn % N
        T = NT * C
        ok = i_k * BK + tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        ot = tl.arange(0, C)
        kb = k + i_bh.to(tl.int64) * T * D
        vb = v + i_bh.to(tl.int64) * T * E
        wb = w + i_bh.to(tl.int64) * T * N + n
        cb = c + i_bh.to(tl.int64) * T * N + n
        b_h = tl.zeros([BK, BV], dtype=tl.float32)
        # z in a [BK, 16] tile of equal columns, advanced by a dot with ones: the per-step
        # row reduction it replaces cost 0.33 of fwd_h's 1.18 ms at 16K (GPU_NOTES, call 16)
        oz = tl.arange(0, 16)
        zcol = ok[:, None] + oz[None, :] * 0
        zm = (oz == 0)[None, :]
        b_z = tl.zeros([BK, 16], dtype=tl.float32)
        ones = tl.full([C, 16], 1.0, dtype=v.dtype.element_ty)
        if HAS_S0:
            b_h += tl.load(S0 + i_b * sS0 + i_hn * D * E + ok[:, None] * E + ov[None, :])
            b_z += tl.load(z0 + i_b * sz0 + i_hn * D + zcol)
        for j in range(NT):
            slot = (i_bh.to(tl.int64) * NT + j) * N + n
            tl.store(hs + slot * D * E + ok[:, None] * E + ov[None, :],
                     b_h.to(hs.dtype.element_ty))
            if i_v == 0:
                tl.store(zs + slot * D + zcol, b_z, mask=zm)
            t = j * C + ot
            b_k = tl.load(kb + t[:, None] * D + ok[None, :])
            b_v = tl.load(vb + t[:, None] * E + ov[None, :])
            b_w = tl.load(wb + t * N).to(tl.float32)
            b_c = tl.load(cb + t * N)
            b_cT = tl.load(cb + (j * C + C - 1) * N)
            kd = tl.trans((b_k.to(tl.float32) * (b_w * tl.exp(b_cT - b_c))[:, None]).to(
                b_v.dtype))  # [BK,C]
            b_h = b_h * tl.exp(b_cT) + tl.dot(kd, b_v)
            if i_v == 0:
                b_z = b_z * tl.exp(b_cT) + tl.dot(kd, ones)
        tl.store(ST + i_b * sST + i_hn * D * E + ok[:, None] * E + ov[None, :], b_h)
        if i_v == 0:
            tl.store(zT + i_b * szT + i_hn * D + zcol, b_z, mask=zm)

    @triton.jit
    def fwd_o(q, k, v, r, w, c, hs, zs, o, den, NT, eps,
               N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
               BV: tl.constexpr, R: tl.constexpr):
        """Outputs of one C-row block and E-tile: intra-block scores, the scores against the
        earlier blocks of its save span (R blocks share one saved memory) and the reads of the
        span-start memory (c: cumsum of log a from the span's start)."""
        i_v, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        T = NT * C
        NS = NT // R
        od = tl.arange(0, D)
        ov = i_v * BV + tl.arange(0, BV)
        ot = tl.arange(0, C)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        b_q = tl.load(q + bh * T * D + t[:, None] * D + od[None, :])
        b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
        b_v = tl.load(v + bh * T * E + t[:, None] * E + ov[None, :])
        causal = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        num = tl.zeros([C, BV], dtype=tl.float32)
        dsum = tl.zeros([C], dtype=tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_r = tl.load(r + rb).to(tl.float32)
            b_w = tl.load(w + rb).to(tl.float32)
            b_c = tl.load(c + rb)
            diff = tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf"))
            M += b_r[:, None] * b_w[None, :] * tl.exp(diff)
            slot = (bh * NS + j // R) * N + n
            b_hn = tl.load(hs + slot * D * E + od[:, None] * E + ov[None, :])
            b_zn = tl.load(zs + slot * D + od)
            s_n = b_r * tl.exp(b_c)  # row scale: applied to the product, q stays as loaded
            num += s_n[:, None] * tl.dot(b_q, b_hn.to(b_q.dtype))
            dsum += s_n * tl.sum(b_q.to(tl.float32) * b_zn[None, :], axis=1)
        A = tl.dot(b_q, tl.trans(b_k)) * M  # M is 0 above the diagonal
        num += tl.dot(A.to(b_v.dtype), b_v)
        dd = dsum + tl.sum(A, axis=1)
        for i in range(j - j % R, j):  # earlier blocks of the span: full (unmasked) tiles
            s = i * C + ot
            Mp = tl.zeros([C, C], dtype=tl.float32)
            for n in range(N):
                b_cs = tl.load(c + bh * T * N + s * N + n)
                Mp += tl.load(r + bh * T * N + t * N + n).to(tl.float32)[:, None] * tl.load(
                    w + bh * T * N + s * N + n).to(tl.float32)[None, :] * tl.exp(
                    tl.load(c + bh * T * N + t * N + n)[:, None] - b_cs[None, :])
            Ap = tl.dot(b_q, tl.trans(tl.load(k + bh * T * D + s[:, None] * D + od[None, :])))
            Ap = Ap * Mp
            num += tl.dot(Ap.to(b_v.dtype), tl.load(v + bh * T * E + s[:, None] * E + ov[None, :]))
            dd += tl.sum(Ap, axis=1)
        dd += eps
        tl.store(o + bh * T * E + t[:, None] * E + ov[None, :],
                 (num / dd[:, None]).to(o.dtype.element_ty))
        if i_v == 0:
            tl.store(den + bh * T + t, dd)

    @triton.jit
    def bwd_dh(q, r, c, dy, dden, dhs, dzs, dST, dzT, dS0, dz0, hs, zs, hp, NT, sST, szT, HN,
                N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr,
                HAS_S0: tl.constexpr = True, HDOT: tl.constexpr = False,
                PF: tl.constexpr = False):
        """Memory gradient backwards across chunks; saves the gradient at each chunk's end.
        HDOT (``hdot_in_dh``, 1 or 2): also the decay gradient's inner products <dS_end,
        S_start> + <dz_end, z_start> from the gradient tile it stores and the saved start (hs,
        zs), as row partials hp [slot, E/BV + 1, D] (the last row: z's) that bwd_decay sums
        (bwd_dv_mem then skips its extra pass over hs, +0.69 ms at 16K in call K6); hs, zs, hp
        unused without HDOT. PF
        (``prefetch_dh``): the chunk-end decay and dden (as a [C] vector) are loaded one step
        ahead (TTGIR: both were plain loads that each step waited on before its dots; the
        pipeliner skips scalars and loads under a runtime branch). dST, dzT: batch rows
        sST / szT elements apart (HN = H*N banks a row), as fwd_h's S0, z0."""
        i_k, i_v, i_bhn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        i_bh, n = i_bhn // N, i_bhn % N
        T = NT * C
        ok = i_k * BK + tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        ot = tl.arange(0, C)
        qb = q + i_bh.to(tl.int64) * T * D
        yb = dy + i_bh.to(tl.int64) * T * E
        db = dden + i_bh.to(tl.int64) * T
        rb = r + i_bh.to(tl.int64) * T * N + n
        cb = c + i_bh.to(tl.int64) * T * N + n
        b_dh = tl.zeros([BK, BV], dtype=tl.float32)
        oz = tl.arange(0, 16)  # dz as in fwd_h: [BK, 16] equal columns, a dot per step
        zcol = ok[:, None] + oz[None, :] * 0
        zm = (oz == 0)[None, :]
        b_dz = tl.zeros([BK, 16], dtype=tl.float32)
        if HAS_DST:
            i_b, i_hn = (i_bhn // HN).to(tl.int64), i_bhn % HN
            b_dh += tl.load(dST + i_b * sST + i_hn * D * E + ok[:, None] * E + ov[None, :])
            b_dz += tl.load(dzT + i_b * szT + i_hn * D + zcol)
        if PF:
            cT_next = tl.load(cb + (NT * C - 1) * N)
            dd_next = tl.load(db + (NT - 1) * C + ot)
        for jj in range(NT):
            j = NT - 1 - jj
            slot = (i_bh.to(tl.int64) * NT + j) * N + n
            dh_lo = b_dh.to(dhs.dtype.element_ty)  # dS_end of chunk j, as stored
            tl.store(dhs + slot * D * E + ok[:, None] * E + ov[None, :], dh_lo)
            if i_v == 0:
                tl.store(dzs + slot * D + zcol, b_dz, mask=zm)
            if HDOT:  # from the stored (rounded) tile, in its store layout: no conversion of
                # the fp32 accumulator (that cost 30 registers and spilled), and the same
                # operands as bwd_dv_mem's product
                b_hs = tl.load(hs + slot * D * E + ok[:, None] * E + ov[None, :])
                if HDOT == 2:  # the diagonal of dS S^T: a dot operand is prefetched (async
                    # pipeline) where a plain load stalls the step (kern2-A); 2x the MMA work
                    P = tl.dot(dh_lo, tl.trans(b_hs))  # [BK, BK]
                    part = tl.sum(tl.where(ok[:, None] == ok[None, :], P, 0.0), axis=1)
                else:
                    part = tl.sum(dh_lo.to(tl.float32) * b_hs.to(tl.float32), axis=1)
                tl.store(hp + (slot * (E // BV + 1) + i_v) * D + ok, part)
                if i_v == 0:  # b_dz's 16 columns are equal: column 0 carries <dz, z> (a row of
                    # its own: adding it to part would put the product in b_dz's layout)
                    tl.store(hp + (slot * (E // BV + 1) + E // BV) * D + ok, tl.sum(
                        tl.where(zm, b_dz * tl.load(zs + slot * D + zcol), 0.0), 1))
            t = j * C + ot
            b_q = tl.load(qb + t[:, None] * D + ok[None, :])
            b_y = tl.load(yb + t[:, None] * E + ov[None, :])
            b_r = tl.load(rb + t * N).to(tl.float32)
            b_c = tl.load(cb + t * N)
            if PF:
                b_cT = cT_next
                b_dd = dd_next
                cT_next = tl.load(cb + (tl.maximum(j - 1, 0) * C + C - 1) * N)  # next step's
                dd_next = tl.load(db + tl.maximum(j - 1, 0) * C + ot)
            else:
                b_cT = tl.load(cb + (j * C + C - 1) * N)
            qs = tl.trans((b_q.to(tl.float32) * (b_r * tl.exp(b_c))[:, None]).to(
                b_y.dtype))  # [BK,C]
            b_dh = b_dh * tl.exp(b_cT) + tl.dot(qs, b_y)
            if i_v == 0:  # dden broadcast over 16 columns: sum_t qs[:, t] dden[t] as a dot
                if PF:
                    b_dd16 = (b_dd[:, None] + tl.zeros([C, 16], dtype=tl.float32)).to(b_y.dtype)
                else:
                    b_dd16 = tl.load(db + t[:, None] + oz[None, :] * 0).to(b_y.dtype)
                b_dz = b_dz * tl.exp(b_cT) + tl.dot(qs, b_dd16)
        if HAS_S0:  # the incoming memory's gradient (else dS0, dz0 are not allocated)
            tl.store(dS0 + i_bhn.to(tl.int64) * D * E + ok[:, None] * E + ov[None, :], b_dh)
            if i_v == 0:
                tl.store(dz0 + i_bhn.to(tl.int64) * D + zcol, b_dz, mask=zm)
