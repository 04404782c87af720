"""A graph chunk's ponder iterations in one launch (``StackConfig.persistent``).

stack_ctrl.py runs one kernel per ponder iteration: a chunk of U decoder steps with ``max_steps``
iterations each is U * max_steps launches forward and as many backward, each ~16 us on the H200
for an image batch (20 examples, 2,401 steps: 20 programs on 132 SMs), most of it the
iteration's chain of dependent loads (GPU_NOTES, P34). Here one program per example runs the
chunk's iterations in order, calling the same iteration code (``_iter_fwd`` / ``_iter_bwd``)
with the pointers of each iteration, a block barrier between two: no launch or ramp per
iteration, and the controller's weights, read again by every iteration, stay warm in the SM's
L1. Examples never read each other's rows, so a program needs no other program's results.
On the H200 (GPU_NOTES P37), ms per step forward + backward: 20 x 2,401 steps 0.067 -> 0.061,
64 x 128 0.084 -> 0.075, but 300 x 96 0.205 -> 0.218 (more programs than SMs run in waves), so
:meth:`CtrlRunner._one_launch` takes this form only for batches of at most one example per SM.

Only the ring's saved path (what training runs, :meth:`CtrlRunner.forward_saved` and
:meth:`CtrlRunner.backward_saved`) has this form; the iteration buffers are the saved buffer's
rows, as in the per-iteration loop, plus small scratch rows for what passes from one iteration
to the next (e between iterations; backward: the gradients of s, left and e).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .stack_ctrl import _iter_bwd, _iter_fwd


@triton.jit
def _fwd_step(u, E, se, R, sr, ACC, sa, WC, BC, WA, BA, WV, BV, ES, ses, SCR, RV, S, X, EN,
              VN, BOT, RUNS, LEFTS, HDS, READS, srd, PE, spe, B, K: tl.constexpr,
              W: tl.constexpr, H: tl.constexpr, eps, G: tl.constexpr, BK: tl.constexpr,
              BH: tl.constexpr, WCH: tl.constexpr, IC: tl.constexpr, MS: tl.constexpr,
              LOWP: tl.constexpr, PRE_E: tl.constexpr, SAVE_READ: tl.constexpr,
              ACTIVE: tl.constexpr):
    # step u's MS iterations; iteration j = u * MS + i reads rows j and writes rows j + 1 of
    # the saved buffer (s, run, left, head), as CtrlRunner._states does
    for i in tl.static_range(MS):
        j = u * MS + i
        if i == 0:
            ein, sein, rin, srin = E + u * H, se, R + u, sr
        else:
            ein, sein, rin, srin = SCR + (i - 1) * B * H, H, RUNS + j * B, 1
        if i == MS - 1:
            eo, seo = ES + u * H, ses
        else:
            eo, seo = SCR + i * B * H, H
        acc = ACC + u * W
        _iter_fwd(ein, sein, RV, S + j * B * K, rin, srin, acc, sa, LEFTS + j * B, WC, BC, WA,
                  BA, WV, BV, eo, seo, RV, S + (j + 1) * B * K, acc, sa, LEFTS + (j + 1) * B,
                  RUNS + (j + 1) * B, READS + (u - 1) * W, srd, X + j * B * (H + W),
                  EN + j * B * H, VN + j * B * W, HDS + j * B, HDS + (j + 1) * B,
                  BOT + j * B * W, PE + u * H, spe, B, K, W, H, eps, G, BK, BH, WCH, IC,
                  FIRST=i == 0, SAVE_READ=SAVE_READ and i == 0, SAVE=True, LOWP=LOWP,
                  RING=True, ACTIVE=ACTIVE, PRE_E=PRE_E and i == 0)
        tl.debug_barrier()  # this iteration's rows are written before the next reads them


@triton.jit
def _chunk_fwd(E, se, R, sr, ACC, sa, WC, BC, WA, BA, WV, BV, ES, ses, SCR, RV, S, X, EN, VN,
               BOT, RUNS, LEFTS, HDS, READS, srd, PE, spe, U, B, K: tl.constexpr,
               W: tl.constexpr, H: tl.constexpr, eps, G: tl.constexpr, BK: tl.constexpr,
               BH: tl.constexpr, WCH: tl.constexpr, IC: tl.constexpr, MS: tl.constexpr,
               LOWP: tl.constexpr, PRE_E: tl.constexpr, ACTIVE: tl.constexpr = True):
    # the first step has no previous step whose output read it would store
    _fwd_step(0, E, se, R, sr, ACC, sa, WC, BC, WA, BA, WV, BV, ES, ses, SCR, RV, S, X, EN, VN,
              BOT, RUNS, LEFTS, HDS, READS, srd, PE, spe, B, K, W, H, eps, G, BK, BH, WCH,
              IC, MS, LOWP, PRE_E, False, ACTIVE)
    for u in range(1, U):
        _fwd_step(u, E, se, R, sr, ACC, sa, WC, BC, WA, BA, WV, BV, ES, ses, SCR, RV, S, X, EN,
                  VN, BOT, RUNS, LEFTS, HDS, READS, srd, PE, spe, B, K, W, H, eps, G, BK, BH,
                  WCH, IC, MS, LOWP, PRE_E, True, ACTIVE)


@triton.jit
def _bwd_step(u, U, RV, S, R, sr, RUNS, LEFTS, EN, VN, WCT, WA, BA, WV, GE_IN, sgi, GV, GSS,
              GACC, sga, GL, ZERO, GREAD, sgr, DE, sde, GEN, GPRE, GLG, GVP, HDS, BOT, B,
              K: tl.constexpr, W: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
              BK: tl.constexpr, BH: tl.constexpr, WCH: tl.constexpr, IC: tl.constexpr,
              MS: tl.constexpr, LOWP: tl.constexpr, PRE_E: tl.constexpr,
              HAS_GREAD: tl.constexpr, ACTIVE: tl.constexpr):
    # step u's iterations, last first, as CtrlRunner._backward. The gradient of s passes
    # through two slots by the parity of the iterations done so far (k); the gradients of e
    # and left between a step's iterations through GEN[i] and GL[i]
    for ii in tl.static_range(MS):
        i = MS - 1 - ii
        j = u * MS + i
        k = (U - 1 - u) * MS + ii
        if i == MS - 1:
            geo, sgeo, gleft = GE_IN + u * H, sgi, ZERO
        else:
            geo, sgeo, gleft = GEN + (i + 1) * B * H, H, GL + (i + 1) * B
        if i == 0:
            ge, sge, rj, srj = DE + u * H, sde, R + u, sr
        else:
            ge, sge, rj, srj = GEN + i * B * H, H, RUNS + j * B, 1
        gacc = GACC + u * W
        _iter_bwd(RV, S + j * B * K, rj, srj, LEFTS + j * B, EN + j * B * H, VN + j * B * W,
                  WCT, WA, BA, WV, geo, sgeo, GV, GSS + (k % 2) * B * K, gacc, sga, gleft,
                  GREAD + (u - 1) * W, sgr, ge, sge, GV, GSS + ((k + 1) % 2) * B * K,
                  GL + i * B, GPRE + j * B * H, GLG + j * B * 3, GVP + j * B * W,
                  HDS + j * B, BOT + j * B * W, B, K, W, H, G, BK, BH, WCH, IC,
                  FIRST=i == 0, HAS_GREAD=HAS_GREAD and i == 0, LOWP=LOWP, RING=True,
                  ACTIVE=ACTIVE, PRE_E=PRE_E and i == 0)
        tl.debug_barrier()


@triton.jit
def _chunk_bwd(RV, S, R, sr, RUNS, LEFTS, EN, VN, WCT, WA, BA, WV, GE_IN, sgi, GV, GSS, GACC,
               sga, GL, ZERO, GREAD, sgr, DE, sde, GEN, GPRE, GLG, GVP, HDS, BOT, U, B,
               K: tl.constexpr, W: tl.constexpr, H: tl.constexpr, G: tl.constexpr,
               BK: tl.constexpr, BH: tl.constexpr, WCH: tl.constexpr, IC: tl.constexpr,
               MS: tl.constexpr, LOWP: tl.constexpr, PRE_E: tl.constexpr,
               ACTIVE: tl.constexpr = True):
    for uu in range(0, U - 1):  # steps U-1 .. 1: their first iteration gets the read's grad
        _bwd_step(U - 1 - uu, U, RV, S, R, sr, RUNS, LEFTS, EN, VN, WCT, WA, BA, WV, GE_IN, sgi,
                  GV, GSS, GACC, sga, GL, ZERO, GREAD, sgr, DE, sde, GEN, GPRE, GLG, GVP, HDS,
                  BOT, B, K, W, H, G, BK, BH, WCH, IC, MS, LOWP, PRE_E, True, ACTIVE)
    _bwd_step(0, U, RV, S, R, sr, RUNS, LEFTS, EN, VN, WCT, WA, BA, WV, GE_IN, sgi, GV, GSS,
              GACC, sga, GL, ZERO, GREAD, sgr, DE, sde, GEN, GPRE, GLG, GVP, HDS, BOT, B, K, W,
              H, G, BK, BH, WCH, IC, MS, LOWP, PRE_E, False, ACTIVE)


# launch options Triton takes beside a kernel's parameters
_LAUNCH = frozenset(("num_warps", "num_stages", "num_ctas", "maxnreg"))


def check_opts(kernel, opts: dict) -> None:
    """Refuse launch options that are neither ``kernel``'s parameters nor Triton's launch
    options: compiled Triton raises on them only at the launch, and its CPU interpreter drops
    them silently (so a benchmark's ``ACTIVE=0`` once passed the interpreter's tests and then
    failed on the GPU)."""
    bad = sorted(set(opts) - set(kernel.arg_names) - _LAUNCH)
    if bad:
        raise ValueError(f"{kernel.fn.__name__}: launch options {bad} are not parameters of "
                         f"the one-launch chunk kernel (stack_chunk.py)")


def forward(grid, e, r, accs, ws, es, scr, sv, reads, pe, B, U, K, W, H, eps, ms, lowp, pre_e,
            opts) -> None:
    """Launch :func:`_chunk_fwd` on the saved buffer's views ``sv`` (CtrlRunner._views)."""
    check_opts(_chunk_fwd, opts)
    _chunk_fwd[grid](e, e.stride(0), r, r.stride(0), accs, accs.stride(0), *ws, es,
                     es.stride(0), scr, sv["ring"], sv["s"], sv["x"], sv["en"], sv["vn"],
                     sv["bot"], sv["run"], sv["left"], sv["hd"], reads, reads.stride(0), pe,
                     pe.stride(0), U, B, K, W, H, eps, MS=ms, LOWP=lowp, PRE_E=pre_e, **opts)


def backward(grid, ring, sv, r, wct, wa, ba, wv, g_e, g_V, gss, g_acc, gl, zero, g_read, de,
             gen, GPRE, GLG, GVP, B, U, K, W, H, ms, lowp, pre_e, opts) -> None:
    """Launch :func:`_chunk_bwd`; ``gss`` [2,B,K] holds the incoming d/ds in slot 0 and ends
    with d/ds at the chunk's start in slot ``(U * ms) % 2``."""
    check_opts(_chunk_bwd, opts)
    _chunk_bwd[grid](ring, sv["s"], r, r.stride(0), sv["run"], sv["left"], sv["en"], sv["vn"],
                     wct, wa, ba, wv, g_e, g_e.stride(0), g_V, gss, g_acc, g_acc.stride(0), gl,
                     zero, g_read, g_read.stride(0), de, de.stride(0), gen, GPRE, GLG, GVP,
                     sv["hd"], sv["bot"], U, B, K, W, H, MS=ms, LOWP=lowp, PRE_E=pre_e, **opts)
