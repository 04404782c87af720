"""The backward's memory parts as one launch of interleaved programs (option ``mem_fuse``; see
:mod:`blocklm.model.banked_kernels_bwd` for the kernels it runs as paths).

Why: at D = E = 128, N = 4 the backward's three memory kernels are bound by DRAM bandwidth (75-81%,
GPU_NOTES call K6) and most of their bytes are the saved memories: ``bwd_mem_read`` reads hs,
``bwd_mem_write`` reads dhs, ``bwd_dv_mem`` reads dhs and (for the decay's inner products) hs
again: four passes of B*H*T/C*N*D*E elements (0.54 GB each at 4K tokens). Fusing them into one
program lost (calls 13-14, kern2-A): the fused program holds more tiles than 255 registers allow,
or waits on a plain load of the second memory tile. Here every program does the work of one of
the old kernels, unchanged, but the programs that touch the same chunk's tiles are neighbours in
the launch order (program_id(0) is the path, the fastest-varying index), so they run at the same
time and the second read of a tile is an L2 hit: hs and dhs each come from DRAM about once.

Paths of chunk j (R = 1 only), all at the same warp count:
0 ``_mem_read`` (hs -> dq, dr), 1 ``_hdot_wide`` (``hdot_mf`` > 0, the default; else ``_hdot``:
<dS_end, S_start> + <dz_end, z_start> per bank, for ``bwd_decay``), 2 ``_mem_write`` (dhs -> dk, dw), 3.. ``_dv_mem`` without its inner products, one
path per E-tile of width BV (BV = E / NV: at 4 warps a [C, E] fp32 accumulator per path is large).
"""

from __future__ import annotations

from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:
    from .banked_kernels import slot_hdot
    from .banked_kernels_bwd import _dv_mem, _mem_read, _mem_write

    @triton.jit
    def _hdot(hs, zs, dhs, dzs, hd, j, i_bh, NT, N: tl.constexpr, D: tl.constexpr,
              E: tl.constexpr, BD: tl.constexpr):
        """<dS_end, S_start> + <dz_end, z_start> of chunk j's N slots (R = 1: one per block)."""
        for n in range(N):
            slot = (i_bh.to(tl.int64) * NT + j) * N + n
            tl.store(hd + slot, slot_hdot(hs, zs, dhs, dzs, slot, D=D, E=E, BD=BD))

    @triton.jit
    def _hdot_wide(hs, zs, dhs, dzs, hd, j, i_bh, NT, N: tl.constexpr, D: tl.constexpr,
                   E: tl.constexpr, BD: tl.constexpr, ST: tl.constexpr):
        """``_hdot`` with more bytes in flight (``hdot_mf``): each step's [BD, E] product is
        summed at once (no [BD, E] accumulator: registers go to wider loads), and the steps of
        all N banks are one loop that Triton pipelines ST deep (ST > 1) through shared memory.
        Why: ``_hdot`` waits on every 16 KB step (plain loads are not pipelined, TTGIR), 16
        round trips per chunk for 256 KB, the longest path of the launch."""
        oe = tl.arange(0, E)
        od = tl.arange(0, BD)
        SD: tl.constexpr = D // BD  # steps per bank
        base = (i_bh.to(tl.int64) * NT + j) * N
        tot = tl.zeros([BD], dtype=tl.float32)  # this bank's row sums so far
        for i in tl.range(0, N * SD, num_stages=ST):
            ix = (base + i // SD) * D * E + ((i % SD) * BD + od)[:, None] * E + oe[None, :]
            tot += tl.sum(tl.load(dhs + ix).to(tl.float32) * tl.load(hs + ix).to(tl.float32),
                          axis=1)
            if i % SD == SD - 1:  # the bank's last step: its sum with <dz_end, z_start>
                slot = base + i // SD
                zd = tl.arange(0, D)
                s = tl.sum(tot, axis=0) + tl.sum(tl.load(dzs + slot * D + zd) *
                                                 tl.load(zs + slot * D + zd), axis=0)
                tl.store(hd + slot, s)
                tot = tl.zeros([BD], dtype=tl.float32)

    @triton.jit
    def bwd_mem_all(q, k, v, r, w, c, hs, zs, dhs, dzs, dy, dden, dqi, dki, dvi, dq, dk, dv,
                    dr, dw, wd, hd, NT, N: tl.constexpr, NP: tl.constexpr, D: tl.constexpr,
                    E: tl.constexpr, C: tl.constexpr, BD: tl.constexpr, BV: tl.constexpr,
                    BH: tl.constexpr, HW: tl.constexpr = 0):
        """The memory parts of the backward (dq, dk, dv, the reads' and writes' parts of dr, dw,
        the writes' sums wd and the inner products hd) for R = 1; grid (3 + E / BV, NT, B*H),
        the path first (module docstring). BD: D-slice of the read/write paths; BH: rows per
        step of the inner products; HW > 0: their path is ``_hdot_wide`` pipelined HW deep
        (1: not pipelined)."""
        p, j, i_bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        if p == 0:
            _mem_read(q, r, c, hs, zs, dy, dden, dqi, dq, dr, j, i_bh, NT, N=N, NP=NP, D=D,
                      E=E, C=C, BD=BD, R=1)
        elif p == 1:
            if HW:
                _hdot_wide(hs, zs, dhs, dzs, hd, j, i_bh, NT, N=N, D=D, E=E, BD=BH, ST=HW)
            else:
                _hdot(hs, zs, dhs, dzs, hd, j, i_bh, NT, N=N, D=D, E=E, BD=BH)
        elif p == 2:
            _mem_write(k, v, w, c, dhs, dzs, dki, dk, dw, wd, j, i_bh, NT, N=N, NP=NP, D=D,
                       E=E, C=C, BD=BD, R=1)
        else:
            _dv_mem(k, w, c, hs, zs, dhs, dzs, dvi, dv, hd, p - 3, j, i_bh, NT, N=N, D=D, E=E,
                    C=C, BV=BV, HDOT=False, BR=1, R=1)
