"""One ponder iteration as one Triton kernel, controller included (``StackConfig.fused_ctrl``).

The fused kernels of stack_fused.py left the controller to PyTorch: per iteration three small
matmuls with their autocast casts, tanh, softmax and ``where``, forward, recompute and backward:
~150 kernels per decoder step inside the CUDA graphs, ~2.5 us each (GPU_NOTES.md, S3). Here one
program handles G examples for one whole iteration of
:meth:`blocklm.model.stack.ProcessingStack.ponder`:

* forward (``_iter_fwd``): read (``min(s, relu(1 - above))``-weighted sum of the cells),
  controller (``e_new = tanh(ctrl([e, read]))``, ``p = softmax(act(e_new))``,
  ``v = tanh(val(e_new))``, weights streamed from L2 and reduced on the CUDA cores: the
  matrices are [G, 320] x [320, 256] with G = 1 or 2), pop, accumulate, push (a shifted store);
* backward (``_iter_bwd``): from the iteration's input state and what the forward saved when
  it recomputed the chunk (``SAVE``: the Linear inputs [e, read], e_new and the pushed cell),
  writes the input gradients and, per example, the gradients at the three Linear outputs, from
  which the caller forms the weight gradients with one matmul per chunk (deterministic).

The strengths' [K] work is kept whole per example (the same ``cumsum`` and tie rules as
stack_fused.py); the cells are streamed in chunks of ``WCH`` lanes. Under bf16 autocast
(``LOWP``) the Linear inputs, weights and outputs and the gradients entering and leaving them are
rounded to bf16 where autocast rounds them (accumulation in fp32), so values match the eager
path up to summation order. The loop over iterations is stack_ctrl_loop.py; the tests compare
with the eager reference (tests/model/test_stack_ctrl.py). ``RING`` (``StackConfig.ring``): the
cells as a ring with a head per example instead of a shifted copy per push (stack_ring.py).

``PRE_E`` (a step's first iteration): its e is the step's input embedding, which reads no state,
so the embedding's part of ``ctrl([e, read])`` (and, backward, the gradient through it to e) is
one matmul per chunk in the caller instead of a serial loop over Hd in every kernel: half of the
first iteration's dependent load-then-reduce chunks (8 of 16 at the small preset's Hd=256, W=64).
"""

from __future__ import annotations

try:  # optional: CPU machines (and CI) may have no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    from .stack_ring import _act, _rows, _top, _vload

    @triton.jit
    def _rb(x, LOWP: tl.constexpr):
        # autocast's rounding of a Linear's input, output or gradient (bf16), else nothing
        if LOWP:
            x = x.to(tl.bfloat16).to(tl.float32)
        return x

    @triton.jit
    def _tanh(x):
        # tanh by exp (no tanh in tl): exact limits at +-inf, ~1e-7 absolute error
        return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)

    @triton.jit
    def _cells(S, RUN, sr, LEFT, B, K: tl.constexpr, G: tl.constexpr, BK: tl.constexpr,
               FIRST: tl.constexpr):
        # G examples' strengths [G,BK], the mass above each cell, the read weights, running, left
        g = tl.program_id(0) * G + tl.arange(0, G)
        mg = g < B
        k = tl.arange(0, BK)
        mgk = mg[:, None] & (k < K)[None, :]
        s = tl.load(S + g[:, None] * K + k[None, :], mask=mgk, other=0.0)
        above = tl.cumsum(s, 1) - s
        wt = tl.minimum(s, tl.maximum(1.0 - above, 0.0))
        run = tl.load(RUN + g * sr, mask=mg, other=0.0)
        if FIRST:  # the step's first iteration: nothing has left the stack yet
            left = tl.zeros([G], dtype=tl.float32)
        else:
            left = tl.load(LEFT + g, mask=mg, other=0.0)
        return g, mg, k, mgk, s, above, wt, run, left

    @triton.jit
    def _actions(en, h, mh, WA, BA, H: tl.constexpr, LOWP: tl.constexpr):
        # softmax(act(e_new)) [G,4] (push, pop, no-op, one padding column) and act's weights
        c = tl.arange(0, 4)
        mc = c < 3
        wa = tl.load(WA + c[:, None] * H + h[None, :], mask=mc[:, None] & mh[None, :],
                     other=0.0).to(tl.float32)  # [4,BH]
        ba = _rb(tl.load(BA + c, mask=mc, other=0.0), LOWP)
        lg = _rb(tl.sum(_rb(en, LOWP)[:, None, :] * wa[None, :, :], 2) + ba[None, :], LOWP)
        lg = tl.where(mc[None, :], lg, float("-inf"))
        ex = tl.exp(lg - tl.max(lg, 1)[:, None])
        return c, mc, ex / tl.sum(ex, 1)[:, None], wa

    @triton.jit
    def _iter_fwd(E, se, V, S, RUN, sr, ACC, sa, LEFT, WC, BC, WA, BA, WV, BV,
                  EO, seo, VO, SO, ACCO, sao, LEFTO, RUNO, READ, srd, X, EN, VN, HD, HDO, BOT,
                  PE, spe, B, K: tl.constexpr, W: tl.constexpr, H: tl.constexpr, eps,
                  G: tl.constexpr, BK: tl.constexpr, BH: tl.constexpr, WCH: tl.constexpr,
                  IC: tl.constexpr, FIRST: tl.constexpr, SAVE_READ: tl.constexpr,
                  SAVE: tl.constexpr, LOWP: tl.constexpr, RING: tl.constexpr = False,
                  ACTIVE: tl.constexpr = True, PRE_E: tl.constexpr = False):
        # SAVE (the recompute before backward): the Linear inputs X = [e, read], e_new, v, and
        # with RING the bottom cell (BOT) a push overwrites. RING: V is a ring (VO is V, written
        # in place, one row a push) with the head HD -> HDO; s stays top-first. RING and ACTIVE:
        # only the rows that add something are loaded (read: the top unit of mass; pop: the
        # popped cells), as no other row is rewritten
        g, mg, k, mgk, s, above, wt, run, left = _cells(S, RUN, sr, LEFT, B, K, G, BK, FIRST)
        hd, row = _rows(HD, g, mg, k, K, RING)
        mrd = _act(mgk, wt > 0.0, RING and ACTIVE)
        h = tl.arange(0, BH)
        mh = h < H
        mgh = mg[:, None] & mh[None, :]
        HW = H + W
        pre = tl.zeros([G, BH], dtype=tl.float32)
        for w0 in range(0, W, WCH):  # read, a chunk of lanes at a time, into the matmul
            w = w0 + tl.arange(0, WCH)
            mw = w < W
            v = tl.load(V + g[:, None, None] * K * W + row[:, :, None] * W + w[None, None, :],
                        mask=mrd[:, :, None] & mw[None, None, :], other=0.0)  # [G,BK,WCH]
            rd = tl.sum(wt[:, :, None] * v, 1)  # [G,WCH]
            if SAVE_READ:  # the read of this (input) state: the previous step's output read
                tl.store(READ + g[:, None] * srd + w[None, :], rd, mask=mg[:, None] & mw[None, :])
            if SAVE:
                tl.store(X + g[:, None] * HW + H + w[None, :], _rb(rd, LOWP),
                         mask=mg[:, None] & mw[None, :])
            wc = tl.load(WC + h[:, None] * HW + H + w[None, :], mask=mh[:, None] & mw[None, :],
                         other=0.0).to(tl.float32)  # [BH,WCH]
            pre += tl.sum(_rb(rd, LOWP)[:, None, :] * wc[None, :, :], 2)
        if PRE_E:  # the embedding's part of ctrl([e, read]) came from one matmul per chunk
            pre += tl.load(PE + g[:, None] * spe + h[None, :], mask=mgh, other=0.0)
            if SAVE:
                ec = tl.load(E + g[:, None] * se + h[None, :], mask=mgh, other=0.0)
                tl.store(X + g[:, None] * HW + h[None, :], _rb(ec, LOWP), mask=mgh)
        else:
            for i0 in range(0, H, IC):  # the embedding's part of ctrl([e, read])
                i = i0 + tl.arange(0, IC)
                mi = i < H
                ec = tl.load(E + g[:, None] * se + i[None, :], mask=mg[:, None] & mi[None, :],
                             other=0.0)  # [G,IC]
                if SAVE:
                    tl.store(X + g[:, None] * HW + i[None, :], _rb(ec, LOWP),
                             mask=mg[:, None] & mi[None, :])
                wc = tl.load(WC + h[:, None] * HW + i[None, :],
                             mask=mh[:, None] & mi[None, :], other=0.0).to(tl.float32)
                pre += tl.sum(_rb(ec, LOWP)[:, None, :] * wc[None, :, :], 2)  # [BH,IC] above
        bc = _rb(tl.load(BC + h, mask=mh, other=0.0), LOWP)
        en = tl.where(mgh, _tanh(_rb(pre + bc[None, :], LOWP)), 0.0)
        if SAVE:
            tl.store(EN + g[:, None] * H + h[None, :], en, mask=mgh)
        e = tl.load(E + g[:, None] * se + h[None, :], mask=mgh, other=0.0)
        tl.store(EO + g[:, None] * seo + h[None, :], tl.where(run[:, None] > 0, en, e),
                 mask=mgh)  # a stopped example keeps its e
        c, mc, p, wa = _actions(en, h, mh, WA, BA, H, LOWP)
        push = tl.sum(tl.where(c[None, :] == 0, p, 0.0), 1) * run
        pop = tl.minimum(tl.sum(tl.where(c[None, :] == 1, p, 0.0), 1) * run, 1.0 - left)
        new = tl.maximum(s - tl.maximum(pop[:, None] - above, 0.0), 0.0)
        popped = s - new
        left = left + tl.sum(popped, 1)
        tl.store(LEFTO + g, left, mask=mg)
        tl.store(RUNO + g, run * (left < 1.0 - eps).to(tl.float32), mask=mg)
        off = (push > 0).to(tl.int32)  # a push of exactly 0 (padding, halted) keeps the cells
        dst = k[None, :] + off[:, None]  # cell k goes to k+1 on a push; the bottom falls off
        tl.store(SO + g[:, None] * K + dst, new, mask=mgk & (dst < K))
        tl.store(SO + g * K, push, mask=mg & (off > 0))
        hn = _top(hd, off, K, RING)
        if RING:
            tl.store(HDO + g, hn, mask=mg)
        macc = _act(mgk, (popped != 0.0) | (k == K - 1)[None, :], RING and ACTIVE)  # + BOT's row
        for w0 in range(0, W, WCH):
            w = w0 + tl.arange(0, WCH)
            mw = w < W
            m2 = mg[:, None] & mw[None, :]
            m3 = mgk[:, :, None] & mw[None, None, :]
            v = tl.load(V + g[:, None, None] * K * W + row[:, :, None] * W + w[None, None, :],
                        mask=macc[:, :, None] & mw[None, None, :], other=0.0)
            a = tl.sum(popped[:, :, None] * v, 1)
            if not FIRST:
                a += tl.load(ACC + g[:, None] * sa + w[None, :], mask=m2, other=0.0)
            tl.store(ACCO + g[:, None] * sao + w[None, :], a, mask=m2)
            if not RING:
                tl.store(VO + g[:, None, None] * K * W + dst[:, :, None] * W + w[None, None, :],
                         v, mask=m3 & (dst < K)[:, :, None])
            wv = tl.load(WV + w[:, None] * H + h[None, :], mask=mw[:, None] & mh[None, :],
                         other=0.0).to(tl.float32)  # [WCH,BH]
            bv = _rb(tl.load(BV + w, mask=mw, other=0.0), LOWP)
            vn = _tanh(_rb(tl.sum(_rb(en, LOWP)[:, None, :] * wv[None, :, :], 2) + bv[None, :],
                           LOWP))  # [G,WCH] the pushed cell
            if SAVE:
                tl.store(VN + g[:, None] * W + w[None, :], vn, mask=m2)
            if RING:
                if SAVE:  # the bottom cell, which the push overwrites: the backward needs it
                    bot = tl.sum(tl.where((k == K - 1)[None, :, None], v, 0.0), 1)
                    tl.store(BOT + g[:, None] * W + w[None, :], bot, mask=m2)
                tl.debug_barrier()  # every lane has read the bottom row before it is replaced
            tl.store(VO + g[:, None] * K * W + hn[:, None] * W + w[None, :], vn,
                     mask=m2 & (off > 0)[:, None])

    @triton.jit
    def _iter_bwd(V, S, RUN, sr, LEFT, EN, VN, WCT, WA, BA, WV,
                  GEO, sgeo, GVO, GSO, GACC, sga, GLEFT, GREAD, sgr,
                  GE, sge, GV, GS, GLEFTI, GPRE, GLG, GVP, HD, BOT, B, K: tl.constexpr,
                  W: tl.constexpr, H: tl.constexpr, G: tl.constexpr, BK: tl.constexpr,
                  BH: tl.constexpr, WCH: tl.constexpr, IC: tl.constexpr,
                  FIRST: tl.constexpr, HAS_GREAD: tl.constexpr, LOWP: tl.constexpr,
                  RING: tl.constexpr = False, ACTIVE: tl.constexpr = True,
                  PRE_E: tl.constexpr = False):
        # from the iteration's input state and what its recompute saved (e_new, v); WCT is
        # ctrl's weight transposed ([Hd+W, Hd]), so each product below reduces along a row.
        # RING: V is the ring after this iteration (head HD before it), its overwritten bottom
        # cell in BOT; the kernel writes that cell back (V becomes this iteration's input
        # state) and turns the ring's gradient in place (GV is GVO); with ACTIVE only in the rows
        # whose gradient changes, and it loads a cell only where its product is used below
        g, mg, k, mgk, s, above, wt, run, left = _cells(S, RUN, sr, LEFT, B, K, G, BK, FIRST)
        hd, row = _rows(HD, g, mg, k, K, RING)
        h = tl.arange(0, BH)
        mh = h < H
        mgh = mg[:, None] & mh[None, :]
        en = tl.load(EN + g[:, None] * H + h[None, :], mask=mgh, other=0.0)
        c, mc, p, wa = _actions(en, h, mh, WA, BA, H, LOWP)
        p0 = tl.sum(tl.where(c[None, :] == 0, p, 0.0), 1)
        p1r = tl.sum(tl.where(c[None, :] == 1, p, 0.0), 1) * run
        ub = 1.0 - left
        pop = tl.minimum(p1r, ub)
        push = p0 * run
        a = pop[:, None] - above
        z = s - tl.maximum(a, 0.0)
        popped = s - tl.maximum(z, 0.0)
        off = (push > 0).to(tl.int32)
        src = k[None, :] + off[:, None]  # where cell k went
        hn = _top(hd, off, K, RING)
        if RING:  # the row the push overwrote (the input's bottom cell, now in BOT)
            lost = (row == hn[:, None]) & (off[:, None] > 0)
        else:
            lost = row < 0
        # d/d popped is used where the pop reaches (a > 0) or the cell is empty (z <= 0), d/d the
        # read weights where the top unit reaches (above < 1) or s == 0 (the min's tie rule)
        need_gp = _act(mgk, (a > 0.0) | (s <= 0.0), RING and ACTIVE)
        need_gw = _act(mgk, (above < 1.0) | (s <= 0.0), RING and ACTIVE)
        mgv = _act(mgk, (popped != 0.0) | (wt != 0.0) | lost, RING and ACTIVE)
        gnew = tl.load(GSO + g[:, None] * K + src, mask=mgk & (src < K), other=0.0)
        gpush = tl.where(off > 0, tl.load(GSO + g * K, mask=mg, other=0.0), 0.0)
        gp = tl.zeros([G, BK], dtype=tl.float32)  # d/d popped
        gen_v = tl.zeros([G, BH], dtype=tl.float32)
        for w0 in range(0, W, WCH):
            w = w0 + tl.arange(0, WCH)
            mw = w < W
            m2 = mg[:, None] & mw[None, :]
            v = _vload(V, BOT, g, mg, row, lost, w, need_gp[:, :, None] & mw[None, None, :], K,
                       W, RING)
            gacc = tl.load(GACC + g[:, None] * sga + w[None, :], mask=m2, other=0.0)
            gp += tl.sum(v * gacc[:, None, :], 2)
            vn = tl.load(VN + g[:, None] * W + w[None, :], mask=m2, other=0.0)
            gvn = tl.load(GVO + g[:, None] * K * W + hn[:, None] * W + w[None, :],
                          mask=m2 & (off > 0)[:, None], other=0.0)
            gvp = _rb(gvn * (1.0 - vn * vn), LOWP)  # at val's output
            tl.store(GVP + g[:, None] * W + w[None, :], gvp, mask=m2)
            wv = tl.load(WV + w[:, None] * H + h[None, :], mask=mw[:, None] & mh[None, :],
                         other=0.0).to(tl.float32)  # [WCH,BH]
            gen_v += tl.sum(gvp[:, :, None] * wv[None, :, :], 1)
        gp += tl.load(GLEFT + g, mask=mg, other=0.0)[:, None]
        gz = tl.where(z > 0.0, gnew - gp, 0.0)
        ga = tl.where(mgk & (a > 0.0), -gz, 0.0)  # d/d (pop - above)
        gpop = tl.sum(ga, 1)
        gs = gp + gz
        gab = -ga  # d/d above, accumulated (read below)
        # torch.minimum(p1 * running, 1 - left): the smaller side, half each on a tie
        gp1r = tl.where(p1r < ub, gpop, tl.where(p1r == ub, 0.5 * gpop, 0.0))
        gub = tl.where(ub < p1r, gpop, tl.where(p1r == ub, 0.5 * gpop, 0.0))
        tl.store(GLEFTI + g, tl.load(GLEFT + g, mask=mg, other=0.0) - gub, mask=mg)
        gpv = tl.where(c[None, :] == 0, (gpush * run)[:, None],
                       tl.where(c[None, :] == 1, (gp1r * run)[:, None], 0.0))
        glg = _rb(p * (gpv - tl.sum(p * gpv, 1)[:, None]), LOWP)  # softmax backward
        tl.store(GLG + g[:, None] * 3 + c[None, :], glg, mask=mg[:, None] & mc[None, :])
        gen = _rb(gen_v, LOWP) + _rb(tl.sum(glg[:, :, None] * wa[None, :, :], 1), LOWP)
        geo = tl.load(GEO + g[:, None] * sgeo + h[None, :], mask=mgh, other=0.0)
        gen += tl.where(run[:, None] > 0, geo, 0.0)
        gpre = _rb(tl.where(mgh, gen * (1.0 - en * en), 0.0), LOWP)
        tl.store(GPRE + g[:, None] * H + h[None, :], gpre, mask=mgh)
        if PRE_E:  # d/d e through ctrl: the caller's one matmul per chunk adds it (GPRE)
            tl.store(GE + g[:, None] * sge + h[None, :], tl.where(run[:, None] > 0, 0.0, geo),
                     mask=mgh)
        else:
            for i0 in range(0, H, IC):  # d/d e: through ctrl, and where the example had stopped
                i = i0 + tl.arange(0, IC)
                mi = i < H
                m2 = mg[:, None] & mi[None, :]
                wc = tl.load(WCT + i[:, None] * H + h[None, :], mask=mi[:, None] & mh[None, :],
                             other=0.0).to(tl.float32)  # [IC,BH]
                ge = _rb(tl.sum(gpre[:, None, :] * wc[None, :, :], 2), LOWP)
                ge += tl.where(run[:, None] > 0, 0.0,
                               tl.load(GEO + g[:, None] * sgeo + i[None, :], mask=m2, other=0.0))
                tl.store(GE + g[:, None] * sge + i[None, :], ge, mask=m2)
        gw = tl.zeros([G, BK], dtype=tl.float32)  # d/d read weights
        for w0 in range(0, W, WCH):
            w = w0 + tl.arange(0, WCH)
            mw = w < W
            m2 = mg[:, None] & mw[None, :]
            wc = tl.load(WCT + (H + w[:, None]) * H + h[None, :], mask=mw[:, None] & mh[None, :],
                         other=0.0).to(tl.float32)  # [WCH,BH]
            grd = _rb(tl.sum(gpre[:, None, :] * wc[None, :, :], 2), LOWP)  # d/d read [G,WCH]
            if HAS_GREAD:  # this state's read was also the previous step's output
                grd += tl.load(GREAD + g[:, None] * sgr + w[None, :], mask=m2, other=0.0)
            v = _vload(V, BOT, g, mg, row, lost, w, need_gw[:, :, None] & mw[None, None, :], K,
                       W, RING)
            gw += tl.sum(v * grd[:, None, :], 2)
            m3 = mgv[:, :, None] & mw[None, None, :]  # (ACTIVE: elsewhere gv = gvo, in place)
            if RING:  # the ring's rows in place; the overwritten row's gradient went to vn
                gvo = tl.load(GVO + g[:, None, None] * K * W + row[:, :, None] * W
                              + w[None, None, :], mask=m3 & ~lost[:, :, None], other=0.0)
                bot = tl.load(BOT + g[:, None] * W + w[None, :], mask=m2, other=0.0)
                tl.store(V + g[:, None] * K * W + hn[:, None] * W + w[None, :], bot,
                         mask=m2 & (off > 0)[:, None])
            else:
                gvo = tl.load(GVO + g[:, None, None] * K * W + src[:, :, None] * W
                              + w[None, None, :], mask=m3 & (src < K)[:, :, None], other=0.0)
            gacc = tl.load(GACC + g[:, None] * sga + w[None, :], mask=m2, other=0.0)
            gv = gvo + popped[:, :, None] * gacc[:, None, :] + wt[:, :, None] * grd[:, None, :]
            tl.store(GV + g[:, None, None] * K * W + row[:, :, None] * W + w[None, None, :], gv,
                     mask=m3)
        q = 1.0 - above
        r = tl.maximum(q, 0.0)
        gs += tl.where(s < r, gw, tl.where(s == r, gw * 0.5, 0.0))
        gr = tl.where(r < s, gw, tl.where(s == r, gw * 0.5, 0.0))
        gab += -tl.where(q > 0.0, gr, 0.0)
        gab = tl.where(mgk, gab, 0.0)
        gs += tl.sum(gab, 1)[:, None] - tl.cumsum(gab, 1)  # above_j = sum_{i<j} s_i
        tl.store(GS + g[:, None] * K + k[None, :], gs, mask=mgk)


OVERRIDE: dict = {}  # launch options forced by benchmarks (stack_timing's sweep), else empty


def launch_opts(B: int, K: int, W: int, H: int, backward: bool = False) -> dict:
    """Block sizes: G examples a program, cells whole (BK), lanes in chunks of WCH, the
    embedding in chunks of IC. The programs are latency-bound (one example's loads and
    reductions in sequence), so chunks are large: device call S5 ran IC=8, WCH=8 at 0.31 ms
    a step for B=11; calls N1-N2 (GPU_NOTES.md, 2026-11-23 20:30) WCH 16 -> 32: 0.139 ->
    0.115 ms at B=40 (-17%), 0.212 -> 0.186 at B=144, and IC 32 -> 64 a few % more. ptxas
    (sm_90, offline) for the small preset's stack (W=64, Hd=256, 8 warps, bf16): WCH=32,
    IC=64: forward 124, backward 255 registers, no spills; WCH=64 spills 168-184 bytes in
    the backward; G=2 with 16 warps spills.

    Warps: the forward kernels run 4 (more programs fit an SM; one example's chain loses
    little), the ``backward`` 8 (at 4 its kernels took 1.6x as long, GPU_NOTES P39). H200,
    ms per step forward + backward, both at 8 -> forward at 4 (call P51): 1024 x 32 steps
    0.518 -> 0.468, 300 x 96 0.199 -> 0.182, 20 x 2,401 0.061 -> 0.059."""
    G = 1  # (OVERRIDE may also hold PRE_E=0: the first iterations' products in the kernels)
    BK, BH = triton.next_power_of_2(K), triton.next_power_of_2(H)
    WCH, IC = min(32, triton.next_power_of_2(W)), min(64, BH)
    big = G * BK * WCH >= 2048
    if not big:
        warps = 4
    elif G > 1:
        warps = 16
    else:
        warps = 8 if backward else 4
    opts = dict(G=G, BK=BK, BH=BH, WCH=WCH, IC=IC, num_warps=warps)
    return {**opts, **OVERRIDE}
