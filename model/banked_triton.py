"""Triton kernels (forward + backward) for banked, write-decayed causal linear attention.

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

Kernels (bf16 operands, fp32 accumulation, fp32 recurrent states):
``_fwd_h`` runs the memory across chunks (one program per bank and state tile) and saves each
chunk's starting memory (in the input dtype, as a matmul operand); ``_fwd_o`` computes all chunks'
outputs in parallel; ``_bwd_prep`` splits the output gradient into numerator and normaliser
parts; ``_bwd_dh`` runs the memory gradient backwards across chunks; ``_bwd_dqk`` (twice: reads,
writes) and ``_bwd_dv`` compute the input gradients of all chunks in parallel. The gradient of the
log-decays is ``dc[t,n] = r dr - w dw`` (+ the chunk-end state term at the chunk's last step,
from the inner product of the memory and its gradient); its reverse cumsum within the chunk is
the gradient of log a, turned into those of w and g by ``_bwd_decay``. The chunk cumsums of
log a are computed once per call by ``_decay_prep``.

:func:`banked_attention` dispatches: Triton on CUDA when importable and the shapes suit it,
otherwise :func:`banked_attention_reference` (plain PyTorch, chunked, fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

try:  # optional: CPU machines (and CI) have no triton
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    HAS_TRITON = False


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


if HAS_TRITON:

    @triton.jit
    def _decay_prep(w, g, c, N: tl.constexpr, NP: tl.constexpr, C: tl.constexpr):
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
    def _bwd_hdot(hs, zs, dhs, dzs, hd, D: tl.constexpr, E: tl.constexpr, BD: tl.constexpr):
        """<dS_end, S_start> + <dz_end, z_start> of one (batch*head, chunk, bank) slot."""
        slot = tl.program_id(0).to(tl.int64)
        oe = tl.arange(0, E)
        acc = tl.zeros([BD, E], dtype=tl.float32)
        for d0 in range(0, D, BD):
            ix = slot * D * E + (d0 + tl.arange(0, BD))[:, None] * E + oe[None, :]
            acc += tl.load(dhs + ix).to(tl.float32) * tl.load(hs + ix).to(tl.float32)
        od = tl.arange(0, D)
        tot = tl.sum(tl.sum(acc, axis=1), axis=0)
        tot += tl.sum(tl.load(dzs + slot * D + od) * tl.load(zs + slot * D + od), axis=0)
        tl.store(hd + slot, tot)

    @triton.jit
    def _bwd_decay(r, w, g, c, dr, dw, dg, hd, wd, N: tl.constexpr, NP: tl.constexpr,
                   C: tl.constexpr):
        """Gradient of the log-decays of one chunk: dc = r dr - w dw, plus at the chunk's last
        step d/dc_T of the chunk-end memory, <dS_end, S_end> = e^cT <dS_end, S_start> + sum_s
        w_s dw_s (writes' part); d log a = reverse cumsum of dc within the chunk, then to w, g.
        Inner products rather than a sequence-long cumsum of dc: that one cancels badly."""
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
        slot = (i_bh.to(tl.int64) * NT + j) * N + on
        b_cT = tl.load(c + (i_bh.to(tl.int64) * NT * C + j * C + C - 1) * N + on, mask=on < N,
                       other=0.0)
        last = tl.exp(b_cT) * tl.load(hd + slot, mask=on < N, other=0.0) + tl.load(
            wd + slot, mask=on < N, other=0.0)
        dc = b_r * tl.load(dr + ix, mask=m, other=0.0) - b_w * b_dw
        dc += tl.where((tl.arange(0, C) == C - 1)[:, None], last[None, :], 0.0)
        dla = tl.cumsum(dc, 0, reverse=True)
        a = 1.0 - b_w * (1.0 - b_g[:, None])
        tl.store(dw + ix, b_dw - dla * (1.0 - b_g[:, None]) / a, mask=m)
        tl.store(dg + t, tl.sum(dla * b_w / a, 1))

    @triton.jit
    def _fwd_h(k, v, w, c, hs, zs, S0, z0, ST, zT, NT,
               N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
               BK: tl.constexpr, BV: tl.constexpr, HAS_S0: tl.constexpr):
        """Memory across chunks for one (batch*head, bank, D-tile, E-tile); saves chunk starts."""
        i_k, i_v, i_bhn = tl.program_id(0), tl.program_id(1), tl.program_id(2)
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
        b_z = tl.zeros([BK], dtype=tl.float32)
        if HAS_S0:
            b_h += tl.load(S0 + i_bhn.to(tl.int64) * D * E + ok[:, None] * E + ov[None, :])
            b_z += tl.load(z0 + i_bhn.to(tl.int64) * D + ok)
        for j in range(NT):
            slot = (i_bh.to(tl.int64) * NT + j) * N + n
            tl.store(hs + slot * D * E + ok[:, None] * E + ov[None, :],
                     b_h.to(hs.dtype.element_ty))
            if i_v == 0:
                tl.store(zs + slot * D + ok, b_z)
            t = j * C + ot
            b_k = tl.load(kb + t[:, None] * D + ok[None, :])
            b_v = tl.load(vb + t[:, None] * E + ov[None, :])
            b_w = tl.load(wb + t * N).to(tl.float32)
            b_c = tl.load(cb + t * N)
            b_cT = tl.load(cb + (j * C + C - 1) * N)
            kd = b_k.to(tl.float32) * (b_w * tl.exp(b_cT - b_c))[:, None]  # [C,BK]
            b_h = b_h * tl.exp(b_cT) + tl.dot(tl.trans(kd.to(b_v.dtype)), b_v)
            b_z = b_z * tl.exp(b_cT) + tl.sum(kd, axis=0)
        tl.store(ST + i_bhn.to(tl.int64) * D * E + ok[:, None] * E + ov[None, :], b_h)
        if i_v == 0:
            tl.store(zT + i_bhn.to(tl.int64) * D + ok, b_z)

    @triton.jit
    def _fwd_o(q, k, v, r, w, c, hs, zs, o, den, NT, eps,
               N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
               BV: tl.constexpr):
        """Outputs of one chunk and E-tile: intra-chunk scores + reads of the chunk-start memory."""
        i_v, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        T = NT * C
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
            slot = (bh * NT + j) * N + n
            b_hn = tl.load(hs + slot * D * E + od[:, None] * E + ov[None, :])
            b_zn = tl.load(zs + slot * D + od)
            s_n = b_r * tl.exp(b_c)  # row scale: applied to the product, q stays as loaded
            num += s_n[:, None] * tl.dot(b_q, b_hn.to(b_q.dtype))
            dsum += s_n * tl.sum(b_q.to(tl.float32) * b_zn[None, :], axis=1)
        A = tl.dot(b_q, tl.trans(b_k)) * M  # M is 0 above the diagonal
        num += tl.dot(A.to(b_v.dtype), b_v)
        dd = dsum + tl.sum(A, axis=1) + eps
        tl.store(o + bh * T * E + t[:, None] * E + ov[None, :],
                 (num / dd[:, None]).to(o.dtype.element_ty))
        if i_v == 0:
            tl.store(den + bh * T + t, dd)

    @triton.jit
    def _bwd_prep(do, o, den, dy, dden, E: tl.constexpr, C: tl.constexpr):
        """out = num / den: dy = do / den (numerator), dden = -(do . out) / den (normaliser)."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        t = i_bh.to(tl.int64) * tl.num_programs(0) * C + j * C + tl.arange(0, C)
        oe = tl.arange(0, E)
        b_do = tl.load(do + t[:, None] * E + oe[None, :]).to(tl.float32)
        b_o = tl.load(o + t[:, None] * E + oe[None, :]).to(tl.float32)
        b_den = tl.load(den + t)
        tl.store(dy + t[:, None] * E + oe[None, :], (b_do / b_den[:, None]).to(dy.dtype.element_ty))
        tl.store(dden + t, -tl.sum(b_do * b_o, axis=1) / b_den)

    @triton.jit
    def _bwd_dh(q, r, c, dy, dden, dhs, dzs, dST, dzT, dS0, dz0, NT,
                N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                BK: tl.constexpr, BV: tl.constexpr, HAS_DST: tl.constexpr):
        """Memory gradient backwards across chunks; saves the gradient at each chunk's end."""
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
        b_dz = tl.zeros([BK], dtype=tl.float32)
        if HAS_DST:
            b_dh += tl.load(dST + i_bhn.to(tl.int64) * D * E + ok[:, None] * E + ov[None, :])
            b_dz += tl.load(dzT + i_bhn.to(tl.int64) * D + ok)
        for jj in range(NT):
            j = NT - 1 - jj
            slot = (i_bh.to(tl.int64) * NT + j) * N + n
            tl.store(dhs + slot * D * E + ok[:, None] * E + ov[None, :],
                     b_dh.to(dhs.dtype.element_ty))
            if i_v == 0:
                tl.store(dzs + slot * D + ok, b_dz)
            t = j * C + ot
            b_q = tl.load(qb + t[:, None] * D + ok[None, :])
            b_y = tl.load(yb + t[:, None] * E + ov[None, :])
            b_r = tl.load(rb + t * N).to(tl.float32)
            b_c = tl.load(cb + t * N)
            b_cT = tl.load(cb + (j * C + C - 1) * N)
            qs = b_q.to(tl.float32) * (b_r * tl.exp(b_c))[:, None]  # [C,BK]
            b_dh = b_dh * tl.exp(b_cT) + tl.dot(tl.trans(qs.to(b_y.dtype)), b_y)
            if i_v == 0:
                b_dd = tl.load(db + t)
                b_dz = b_dz * tl.exp(b_cT) + tl.sum(qs * b_dd[:, None], axis=0)
        tl.store(dS0 + i_bhn.to(tl.int64) * D * E + ok[:, None] * E + ov[None, :], b_dh)
        if i_v == 0:
            tl.store(dz0 + i_bhn.to(tl.int64) * D + ok, b_dz)

    @triton.jit
    def _bwd_dqk(q, k, v, r, w, c, hs, zs, dhs, dzs, dy, dden, dx, dsel, wd, NT,
                 N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                 SIDE: tl.constexpr):
        """One chunk (full D and E). SIDE 0 (reads): dq and dr; SIDE 1 (writes): dk, dw (the
        direct part; the decay part is _bwd_decay's) and per bank sum_s w_s dw_s of the memory
        writes. Two launches keep each under the register file."""
        j, i_bh = tl.program_id(0), tl.program_id(1)
        T = NT * C
        od = tl.arange(0, D)
        oe = tl.arange(0, E)
        ot = tl.arange(0, C)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        b_y = tl.load(dy + bh * T * E + t[:, None] * E + oe[None, :])
        b_dd = tl.load(dden + bh * T + t)
        causal = ot[:, None] >= ot[None, :]
        yv = tl.dot(b_y, tl.trans(tl.load(v + bh * T * E + t[:, None] * E + oe[None, :])))
        yv += b_dd[:, None]
        if SIDE == 0:
            b_q = tl.load(q + bh * T * D + t[:, None] * D + od[None, :])
            qk = tl.dot(b_q, tl.trans(tl.load(k + bh * T * D + t[:, None] * D + od[None, :])))
        else:
            b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
            b_v = tl.load(v + bh * T * E + t[:, None] * E + oe[None, :])
            qk = tl.dot(tl.load(q + bh * T * D + t[:, None] * D + od[None, :]), tl.trans(b_k))
        Bm = tl.where(causal, qk * yv, 0.0)
        M = tl.zeros([C, C], dtype=tl.float32)
        b_dx = tl.zeros([C, D], dtype=tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_r = tl.load(r + rb).to(tl.float32)
            b_w = tl.load(w + rb).to(tl.float32)
            b_c = tl.load(c + rb)
            En = tl.exp(tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
            M += b_r[:, None] * b_w[None, :] * En
            slot = (bh * NT + j) * N + n
            if SIDE == 0:  # reads of the chunk-start memory
                d_n = tl.sum(Bm * En * b_w[None, :], axis=1)
                b_hn = tl.load(hs + slot * D * E + od[:, None] * E + oe[None, :])
                b_zn = tl.load(zs + slot * D + od)
                ec = tl.exp(b_c)
                dqt = tl.dot(b_y, tl.trans(b_hn.to(b_y.dtype))) + b_dd[:, None] * b_zn[None, :]
                b_dx += (b_r * ec)[:, None] * dqt
                d_n += ec * tl.sum(b_q.to(tl.float32) * dqt, axis=1)
                tl.store(dsel + rb, d_n)
            else:  # writes into the chunk-end memory
                d_n = tl.sum(Bm * En * b_r[:, None], axis=0)
                b_cT = tl.load(c + bh * T * N + (j * C + C - 1) * N + n)
                b_dhn = tl.load(dhs + slot * D * E + od[:, None] * E + oe[None, :])
                b_dzn = tl.load(dzs + slot * D + od)
                ew = tl.exp(b_cT - b_c)
                dkt = tl.dot(b_v, tl.trans(b_dhn.to(b_v.dtype))) + b_dzn[None, :]
                b_dx += (b_w * ew)[:, None] * dkt
                dwi = ew * tl.sum(b_k.to(tl.float32) * dkt, axis=1)
                tl.store(dsel + rb, d_n + dwi)
                tl.store(wd + slot, tl.sum(b_w * dwi, axis=0))
        dA = yv * M  # M is 0 above the diagonal
        if SIDE == 0:  # k and q are loaded again here rather than held through the bank loop
            b_dx += tl.dot(dA.to(b_q.dtype),
                           tl.load(k + bh * T * D + t[:, None] * D + od[None, :]))
        else:
            b_dx += tl.dot(tl.trans(dA).to(b_k.dtype),
                           tl.load(q + bh * T * D + t[:, None] * D + od[None, :]))
        tl.store(dx + bh * T * D + t[:, None] * D + od[None, :], b_dx.to(dx.dtype.element_ty))

    @triton.jit
    def _bwd_dv(q, k, r, w, c, dhs, dy, dv, NT,
                N: tl.constexpr, D: tl.constexpr, E: tl.constexpr, C: tl.constexpr,
                BV: tl.constexpr):
        """dv of one chunk and E-tile: A^T dy + the writes' share of the chunk-end memory
        gradient."""
        i_v, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        T = NT * C
        od = tl.arange(0, D)
        ov = i_v * BV + tl.arange(0, BV)
        ot = tl.arange(0, C)
        t = j * C + ot
        bh = i_bh.to(tl.int64)
        b_k = tl.load(k + bh * T * D + t[:, None] * D + od[None, :])
        causal = ot[:, None] >= ot[None, :]
        M = tl.zeros([C, C], dtype=tl.float32)
        b_dv = tl.zeros([C, BV], dtype=tl.float32)
        for n in range(N):
            rb = bh * T * N + t * N + n
            b_r = tl.load(r + rb).to(tl.float32)
            b_w = tl.load(w + rb).to(tl.float32)
            b_c = tl.load(c + rb)
            b_cT = tl.load(c + bh * T * N + (j * C + C - 1) * N + n)
            M += b_r[:, None] * b_w[None, :] * tl.exp(
                tl.where(causal, b_c[:, None] - b_c[None, :], float("-inf")))
            slot = (bh * NT + j) * N + n
            b_dhn = tl.load(dhs + slot * D * E + od[:, None] * E + ov[None, :])
            b_dv += (b_w * tl.exp(b_cT - b_c))[:, None] * tl.dot(b_k, b_dhn.to(b_k.dtype))
        A = tl.dot(tl.load(q + bh * T * D + t[:, None] * D + od[None, :]), tl.trans(b_k)) * M
        b_y = tl.load(dy + bh * T * E + t[:, None] * E + ov[None, :])
        b_dv += tl.dot(tl.trans(A).to(b_y.dtype), b_y)
        tl.store(dv + bh * T * E + t[:, None] * E + ov[None, :], b_dv.to(dv.dtype.element_ty))


# Launch settings (tile widths, warps per program); benchmarks may sweep them. Defaults: the best
# measured on an H200 at B=4, H=16, D=128, N=4 (model/GPU_NOTES.md). stages_dqk: pipelining depth
# of _bwd_dqk (None: Triton's default, which at C=128 with D=E=128 needs more shared memory than
# the 227 KB there are, so that case uses 1). tile_h None: 128-wide state tiles when that still
# leaves >= 128 sequential programs (B*H*N*(D/128)*(E/128)), else 64 (measured at 16K: N=4
# 13.0 ms with 128 vs 13.6 with 64; N=1, 64 programs, 6.8 ms with 128 vs 5.4 with 64).
KERNEL_OPTS = {"tile_h": None, "tile_v": 128, "warps_h": 4, "warps_o": 8, "warps_dqk": 8,
               "warps_dv": 8, "stages_dqk": 1}


def _tiles(BHN: int, D: int, E: int) -> tuple[int, int, int]:
    """D- and E-tiles of the state kernels, E-tile of the output and dv kernels."""
    th, tv = KERNEL_OPTS["tile_h"], KERNEL_OPTS["tile_v"]
    if th is None:
        th = 128 if BHN * max(1, D // 128) * max(1, E // 128) >= 128 else 64
    return min(D, th), min(E, th), min(E, tv)


def _decay(w: Tensor, g: Tensor, C: int) -> Tensor:
    """Chunk-local cumsum of log a, [B,H,T,N] fp32 (one small kernel)."""
    B, H, T, N = w.shape
    c = torch.empty(B, H, T, N, device=w.device, dtype=torch.float32)
    _decay_prep[(T // C, B * H)](w, g, c, N=N, NP=triton.next_power_of_2(N), C=C, num_warps=4)
    return c


class BankedAttentionFn(torch.autograd.Function):
    """Triton chunked banked attention on padded inputs: (q, k, v, r, w, g, S0, z0, eps, C)
    with T a multiple of C -> (out, S, z)."""

    @staticmethod
    def forward(ctx, q, k, v, r, w, g, S0, z0, eps, C):
        B, H, T, D = q.shape
        E, N = v.shape[-1], r.shape[-1]
        NT = T // C
        BK, BV, BO = _tiles(B * H * N, D, E)
        dev = q.device
        c = _decay(w, g, C)
        hs = torch.empty(B * H * NT * N * D * E, device=dev, dtype=v.dtype)
        zs = torch.empty(B * H * NT * N * D, device=dev, dtype=torch.float32)
        ST = torch.empty(B, H, N, D, E, device=dev, dtype=torch.float32)
        zT = torch.empty(B, H, N, D, device=dev, dtype=torch.float32)
        has_s0 = S0 is not None
        s0 = S0.contiguous().float() if has_s0 else ST
        zz0 = z0.contiguous().float() if has_s0 else zT
        _fwd_h[(D // BK, E // BV, B * H * N)](
            k, v, w, c, hs, zs, s0, zz0, ST, zT, NT, N=N, D=D, E=E, C=C, BK=BK, BV=BV,
            HAS_S0=has_s0, num_warps=KERNEL_OPTS["warps_h"])
        o = torch.empty(B, H, T, E, device=dev, dtype=v.dtype)
        den = torch.empty(B, H, T, device=dev, dtype=torch.float32)
        _fwd_o[(E // BO, NT, B * H)](q, k, v, r, w, c, hs, zs, o, den, NT, eps,
                                     N=N, D=D, E=E, C=C, BV=BO, num_warps=KERNEL_OPTS["warps_o"])
        ctx.save_for_backward(q, k, v, r, w, g, c, hs, zs, o, den)
        ctx.meta = (has_s0, C)
        return o, ST, zT

    @staticmethod
    def backward(ctx, do, dST, dzT):
        q, k, v, r, w, g, c, hs, zs, o, den = ctx.saved_tensors
        has_s0, C = ctx.meta
        B, H, T, D = q.shape
        E, N = v.shape[-1], r.shape[-1]
        NT = T // C
        BK, BV, BO = _tiles(B * H * N, D, E)
        dev = q.device
        # out = num / den: the numerator's gradient and the normaliser's (a "ones" value column)
        do = do.contiguous() if do is not None else torch.zeros_like(o)
        dy = torch.empty_like(v)
        dden = torch.empty_like(den)
        _bwd_prep[(NT, B * H)](do, o, den, dy, dden, E=E, C=C, num_warps=4)
        has_dst = dST is not None or dzT is not None
        dhs = torch.empty_like(hs)
        dzs = torch.empty_like(zs)
        dS0 = torch.empty(B, H, N, D, E, device=dev, dtype=torch.float32)
        dz0 = torch.empty(B, H, N, D, device=dev, dtype=torch.float32)
        if has_dst:
            dST = (dST if dST is not None else torch.zeros_like(dS0)).float()
            dzT = (dzT if dzT is not None else torch.zeros_like(dz0)).float()
        else:  # not read (HAS_DST=False): no zero tensors to fill
            dST, dzT = dS0, dz0
        _bwd_dh[(D // BK, E // BV, B * H * N)](
            q, r, c, dy, dden, dhs, dzs, dST.contiguous(), dzT.contiguous(), dS0, dz0,
            NT, N=N, D=D, E=E, C=C, BK=BK, BV=BV, HAS_DST=has_dst,
            num_warps=KERNEL_OPTS["warps_h"])
        dv = torch.empty_like(v)
        _bwd_dv[(E // BO, NT, B * H)](q, k, r, w, c, dhs, dy, dv, NT, N=N, D=D, E=E, C=C,
                                      BV=BO, num_warps=KERNEL_OPTS["warps_dv"])
        dq, dk = torch.empty_like(q), torch.empty_like(k)
        dr = torch.empty(B, H, T, N, device=dev, dtype=torch.float32)
        dw = torch.empty_like(dr)
        wd = torch.empty(B * H * NT * N, device=dev, dtype=torch.float32)
        stages = KERNEL_OPTS["stages_dqk"] or (1 if C * D * E > 64 * 128 * 128 else None)
        extra = {} if stages is None else {"num_stages": stages}
        warps = KERNEL_OPTS["warps_dqk"] if D * E >= 8192 else 4
        for dx, dsel, side in ((dq, dr, 0), (dk, dw, 1)):
            _bwd_dqk[(NT, B * H)](q, k, v, r, w, c, hs, zs, dhs, dzs, dy, dden, dx, dsel, wd, NT,
                                  N=N, D=D, E=E, C=C, SIDE=side, num_warps=warps, **extra)
        hd = torch.empty_like(wd)
        _bwd_hdot[(B * H * NT * N,)](hs, zs, dhs, dzs, hd, D=D, E=E, BD=min(D, 8192 // E),
                                     num_warps=4)
        dg = torch.empty(B, H, T, device=dev, dtype=torch.float32)
        _bwd_decay[(NT, B * H)](r, w, g, c, dr, dw, dg, hd, wd, N=N,
                                NP=triton.next_power_of_2(N), C=C, num_warps=4)
        return (dq, dk, dv, dr.to(r.dtype), dw.to(w.dtype), dg.to(g.dtype),
                dS0 if has_s0 else None, dz0 if has_s0 else None, None, None)


def triton_supports(q: Tensor, v: Tensor, chunk: int) -> bool:
    """Whether the kernels take these shapes: D, E, chunk powers of two >= 16, D, E <= 256."""
    def ok(n: int) -> bool:
        return 16 <= n <= 256 and n & (n - 1) == 0
    return HAS_TRITON and ok(q.shape[-1]) and ok(v.shape[-1]) and ok(chunk) and chunk <= 128


def banked_attention_triton(q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor,
                            S0: Tensor | None = None, z0: Tensor | None = None,
                            eps: float = 1e-3, chunk: int = 64
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """Triton path (CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1``). Same contract as
    :func:`banked_attention_reference`; out has v's dtype (use bf16 q, k, v for speed)."""
    T = q.shape[2]
    if (S0 is None) != (z0 is None):  # one given: the other starts empty
        if S0 is None:
            S0 = z0.new_zeros(*z0.shape, v.shape[-1])
        else:
            z0 = S0.new_zeros(S0.shape[:-1])
    pad = (-T) % chunk
    if pad:  # padded steps write nothing (w = 0) and their outputs are dropped
        q, k, v, r, w = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v, r, w))
        g = F.pad(g, (0, pad), value=1.0)
    o, S, z = BankedAttentionFn.apply(q.contiguous(), k.contiguous(), v.contiguous(),
                                      r.contiguous(), w.contiguous(), g.contiguous(),
                                      S0, z0, float(eps), chunk)
    return (o[:, :, :T] if pad else o), S, z


def banked_attention(q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor,
                     S0: Tensor | None = None, z0: Tensor | None = None,
                     eps: float = 1e-3, chunk: int = 64) -> tuple[Tensor, Tensor, Tensor]:
    """Banked attention: the Triton kernels on CUDA where they apply, else the PyTorch reference.
    q, k [B,H,T,D] (feature-mapped), v [B,H,T,E], r, w [B,H,T,N], g [B,H,T], S0 [B,H,N,D,E],
    z0 [B,H,N,D] -> out [B,H,T,E], S, z (fp32)."""
    if q.is_cuda and triton_supports(q, v, chunk):
        return banked_attention_triton(q, k, v, r, w, g, S0, z0, eps, chunk)
    o, S, z = banked_attention_reference(q, k, v, r, w, g, S0, z0, eps, chunk)
    return o.to(v.dtype), S, z
