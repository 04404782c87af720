"""The element head and its loss as two Triton kernels (``ImageConfig.fused_head``, the default
on CUDA with TMA; the autograd function and launch options are :mod:`.patch_kernel`).

:func:`.patch_fused.slice_bits` runs the within-step head as PyTorch ops (Inductor-fused on
CUDA), so every one of an image batch's ~12M element rows (E = 256 sub-pixels a step) passes
through HBM as [rows, w] and [rows, 256] tensors several times: forward, the checkpointed slice's
recompute, backward (72 of an image batch's 293 ms on the H200, GPU_NOTES P50). Here one program
walks whole decoder steps, E elements in tiles of ``TE`` (one loop over its (step, tile) pairs),
and keeps a tile's rows on chip from the value lookup to the loss, the logits ``VC`` values at a
time (the [TE, 256] tile and the weights whole did not fit a program's registers):

* forward (``_fwd``): ``x = gelu(c + pos + prefix of val[e, t_e])``, ``y = gelu(x W1' + b1)``,
  ``logits = y W2' + b2``, the log-sum-exp and the masked bits per step. It writes the bits, each
  element's log-sum-exp and the incoming prefix of each of the backward's (smaller) tiles
  ([M, NPT, w]); no logits, so nothing is checkpointed.
* backward (``_bwd``): the tiles again, last first (the value table's gradient is a sum over
  the *later* elements), the forward recomputed from the saved prefix, then the softmax from the
  saved log-sum-exp and the gradients down to the head's input. It writes what the weight
  gradients need (the logits' gradient, y, x, the first layer's input gradient) for one matrix
  product each and the value rows' gradients, all through tensor descriptors (TMA stores: as
  pointer tensors their addresses took the registers that now let 4 programs share an SM), and
  per program the bias gradients' partial sums; the position gradient follows from the value
  rows' gradients (``patch_kernel``).

``LOWP`` (bf16 autocast): the matrix products take bf16 operands with fp32 accumulation and the
values are rounded to bf16 where autocast rounds them in ``slice_bits`` (the two Linear outputs,
the second GELU's output, the logits and their gradient, the gradients leaving the Linears), so
the results match it up to summation order. Without ``LOWP`` everything is fp32 (products in
IEEE fp32): the CPU tests run the kernels in Triton's interpreter against ``slice_bits``.
"""

from __future__ import annotations

try:  # optional: CPU machines (and CI) may have no triton
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:
    from .stack_ctrl import _rb as _rnd  # autocast's bf16 rounding (LOWP), else nothing

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(x):
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * tl.exp(-0.5 * x * x) * 0.3989422804014327

    @triton.jit
    def _mm(a, b, LOWP: tl.constexpr):
        # [M,K] x [K,N] in fp32 accumulation: bf16 operands under LOWP, else IEEE fp32
        if LOWP:
            out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16))
        else:  # (an early return would leave the rest compiled too)
            out = tl.dot(a, b, input_precision="ieee")
        return out

    @triton.jit
    def _tile(m, s, live, T, MK, POSD, VAL, E, WD: tl.constexpr, V: tl.constexpr,
              TE: tl.constexpr):
        # tile s of step m (``live``: m is a step): element indices, their mask, targets, loss
        # mask, pos and value rows
        r = s * TE + tl.arange(0, TE)
        me = r < tl.where(live, E, 0)
        j = tl.arange(0, WD)
        t = tl.load(T + m * E + r, mask=me, other=0).to(tl.int64)
        mk = tl.load(MK + m * E + r, mask=me, other=0) != 0
        ve = tl.load(VAL + (r.to(tl.int64) * V + t)[:, None] * WD + j[None, :],
                     mask=me[:, None], other=0.0).to(tl.float32)  # [TE, WD]
        pos = POSD.load([s * TE, 0])  # rows past E read as zeros
        return r, me, t, mk & me, ve, pos

    @triton.jit
    def _hidden(c, pos, prev, W1D, B1, WD: tl.constexpr, LOWP: tl.constexpr):
        # the head's first layer on one tile: pre0, x, p1, y [TE,WD] (fp32 values). The
        # weights come through tensor descriptors (TMA on Hopper), per tile from L2: as
        # pointer tensors their addresses alone took most of a thread's registers
        j = tl.arange(0, WD)
        pre0 = c[None, :] + pos + prev
        x = _gelu(pre0)
        w1 = W1D.load([0, 0])  # [out, in]
        b1 = tl.load(B1 + j).to(tl.float32)
        p1 = _rnd(_mm(x, tl.trans(w1), LOWP) + b1[None, :], LOWP)
        y = _rnd(_gelu(p1), LOWP)
        return pre0, x, p1, y

    @triton.jit
    def _chunk_logits(y, W2D, B2, vc, VC: tl.constexpr, LOWP: tl.constexpr):
        # logits of the vocabulary's chunk vc: [TE,VC] (the [TE,V] tile and W2 whole would not
        # fit a program's registers next to the rest), the chunk's value ids [VC], W2's rows
        vv = vc * VC + tl.arange(0, VC)
        w2 = W2D.load([vc * VC, 0])  # [VC, WD]
        b2 = tl.load(B2 + vv).to(tl.float32)
        return _rnd(_mm(y, tl.trans(w2), LOWP) + b2[None, :], LOWP), vv, w2

    # M and RPP vary batch to batch: not specialised (a value of 1 or a multiple of 16 would
    # compile another kernel, ~5-10 s, mid-run)
    @triton.jit(do_not_specialize=["M", "RPP"])
    def _fwd(C, T, MK, POSD, VAL, W1D, B1, W2D, B2, BITS, LSE, PRE, M, E, RPP,
             WD: tl.constexpr, V: tl.constexpr, TE: tl.constexpr, NT: tl.constexpr,
             PT: tl.constexpr, NPT: tl.constexpr, VC: tl.constexpr, NS: tl.constexpr,
             LOWP: tl.constexpr):
        """Steps [pid*RPP, (pid+1)*RPP): bits [M], log-sum-exp [M,E] and the prefixes at the
        backward's tiles of ``PT`` elements [M,NPT,WD] (PT divides TE). One loop over the
        program's (step, tile) pairs (``NS``: its software-pipeline stages)."""
        j = tl.arange(0, WD)
        pid = tl.program_id(0)
        carry = tl.zeros([WD], dtype=tl.float32)
        bits = tl.zeros([TE], dtype=tl.float32)
        for it in tl.range(0, RPP * NT, num_stages=NS):
            i = it // NT
            s = it - i * NT
            m = (pid * RPP + i).to(tl.int64)
            live = m < M
            ml = tl.minimum(m, M - 1)  # past the last step: loads from the last, no stores
            jl = j < tl.where(live, WD, 0)
            carry = tl.where(s == 0, 0.0, carry)
            bits = tl.where(s == 0, 0.0, bits)
            c = tl.load(C + ml * WD + j).to(tl.float32)
            r, me, t, mk, ve, pos = _tile(m, s, live, T, MK, POSD, VAL, E, WD, V, TE)
            for k in tl.static_range(TE // PT):  # the prefix at each backward tile
                sb = s * (TE // PT) + k
                part = tl.sum(tl.where((tl.arange(0, TE) < k * PT)[:, None], ve, 0.0), 0)
                tl.store(PRE + (m * NPT + sb) * WD + j, carry + part,
                         mask=j < tl.where(sb < NPT, jl.to(tl.int32) * WD, 0))
            prev = carry[None, :] + tl.cumsum(ve, 0) - ve
            carry += tl.sum(ve, 0)
            pre0, x, p1, y = _hidden(c, pos, prev, W1D, B1, WD, LOWP)
            # log-sum-exp over the vocabulary chunk by chunk (running max and sum)
            mx = tl.full([TE], float("-inf"), dtype=tl.float32)
            se = tl.zeros([TE], dtype=tl.float32)
            tgt = tl.zeros([TE], dtype=tl.float32)
            for vc in tl.static_range(V // VC):
                lg, vv, w2 = _chunk_logits(y, W2D, B2, vc, VC, LOWP)
                mn = tl.maximum(mx, tl.max(lg, 1))
                se = se * tl.exp(mx - mn) + tl.sum(tl.exp(lg - mn[:, None]), 1)
                mx = mn
                tgt += tl.sum(tl.where(vv[None, :] == t[:, None], lg, 0.0), 1)
            lse = mx + tl.log(se)
            bits += tl.where(mk, lse - tgt, 0.0)
            tl.store(LSE + m * E + r, lse, mask=me)
            total = tl.zeros([WD], tl.float32) + tl.sum(bits, 0) / 0.6931471805599453
            # one lane writes the step's bits after its last tile
            tl.store(BITS + m + j * 0, total, mask=j < tl.where(s == NT - 1, jl.to(tl.int32), 0))

    @triton.jit(do_not_specialize=["M", "RPP"])
    def _bwd(C, T, MK, POSD, VAL, W1D, B1, W2D, B2, LSE, PRE, G, DC, DVED, DLD, YD, XD, DP1D,
             DB1, DB2, M, E, RPP, WD: tl.constexpr, V: tl.constexpr, TE: tl.constexpr,
             NT: tl.constexpr, VC: tl.constexpr, NS: tl.constexpr, LOWP: tl.constexpr):
        """Steps [pid*RPP, (pid+1)*RPP), each step's tiles last first: d c [M,WD]; per element
        row (NT*TE rows a step, the rows past E zero or unused) d val-row [.,WD], the logits'
        gradient [.,V], y, x and the first Linear's output gradient [.,WD], written through
        tensor descriptors (TMA: as pointer tensors their addresses spilled registers); this
        program's bias-gradient sums DB1[pid] [WD], DB2[pid] [V] (zeroed by the caller)."""
        j = tl.arange(0, WD)
        pid = tl.program_id(0)
        db1 = tl.zeros([WD], dtype=tl.float32)
        later = tl.zeros([WD], dtype=tl.float32)  # sum of d pre0 over the step's later tiles
        for it in tl.range(0, RPP * NT, num_stages=NS):
            i = it // NT
            q = it - i * NT
            s = NT - 1 - q
            m = (pid * RPP + i).to(tl.int64)
            live = m < M
            ml = tl.minimum(m, M - 1)  # past the last step: loads from the last, no stores
            later = tl.where(q == 0, 0.0, later)
            c = tl.load(C + ml * WD + j).to(tl.float32)
            gm = tl.load(G + ml).to(tl.float32) / 0.6931471805599453
            r, me, t, mk, ve, pos = _tile(m, s, live, T, MK, POSD, VAL, E, WD, V, TE)
            carry = tl.load(PRE + (ml * NT + s) * WD + j)
            prev = carry[None, :] + tl.cumsum(ve, 0) - ve
            pre0, x, p1, y = _hidden(c, pos, prev, W1D, B1, WD, LOWP)
            # past the last step: out of bounds, TMA writes nothing (rows < 2**31: the caller)
            row0 = ((m * NT + s) * TE).to(tl.int32)
            YD.store([row0, 0], y.to(YD.dtype))
            XD.store([row0, 0], x.to(XD.dtype))
            lse = tl.load(LSE + m * E + r, mask=me, other=0.0)
            g = tl.where(mk, gm, 0.0)
            dy = tl.zeros([TE, WD], dtype=tl.float32)
            for vc in tl.static_range(V // VC):
                lg, vv, w2 = _chunk_logits(y, W2D, B2, vc, VC, LOWP)
                p = tl.exp(lg - lse[:, None])
                dl = tl.where(vv[None, :] == t[:, None], p - 1.0, p)
                dl = _rnd(dl * g[:, None], LOWP)  # [TE, VC]
                DLD.store([row0, vc * VC], dl.to(DLD.dtype))
                b2p = DB2 + pid * V + vv
                tl.store(b2p, tl.load(b2p) + tl.sum(dl, 0))
                dy += _mm(dl, w2, LOWP)
            dy = _rnd(dy, LOWP)
            dp1 = _rnd(dy * _gelu_grad(p1), LOWP)
            DP1D.store([row0, 0], dp1.to(DP1D.dtype))
            db1 += tl.sum(dp1, 0)
            w1 = W1D.load([0, 0])  # [out, in]
            dx = _rnd(_mm(dp1, w1, LOWP), LOWP)
            d0 = dx * _gelu_grad(pre0)  # d pre0, fp32 [TE, WD]
            tot = tl.sum(d0, 0)
            # the value row of element e feeds every later element's prefix
            dve = later[None, :] + tot[None, :] - tl.cumsum(d0, 0)
            later += tot
            DVED.store([row0, 0], dve)
            tl.store(DC + m * WD + j, later, mask=j < tl.where(s == 0, tl.where(live, WD, 0), 0))
        tl.store(DB1 + pid * WD + j, db1)
