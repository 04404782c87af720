"""A decoder layer's RMS norms as one Triton kernel each way (CUDA; opt-in,
``DecoderConfig.fused_add_norm``): ``rms_norm(x + f + bias) * weight`` at the layer's end, and
``rms_norm(u) * weight`` at its core.

Under bf16 autocast the stream x is fp32 for text (the token embedding) and bf16 for images and
audio (their embeddings are linear layers); the feed-forward's output f is bf16. In PyTorch a
layer's end is the feed-forward's bias (an addmm epilogue; backward, a column sum), the residual
add, the norm (for a bf16 stream, with the weight cast to bf16 at every call and that cast's
backward), and, for an fp32 stream, the next layer's cast of x to bf16: 3-4 launches forward and
~5 backward per layer and batch, and the core's norm 2 and ~3 more. Here the forward reads x, f
once and writes y in x's dtype and, for an fp32 stream, in bf16 as well (the next layer's
input); the backward recomputes the sum and its norm from x, f (saved: nothing else is), takes
both outputs' gradients, writes the gradients of x and f (one tensor when they share a dtype)
and one partial row of the bias's and the weight's gradients per program, summed by one launch.

Measured on the H200 (GPU_NOTES, calls P99-P102): 4.0% fewer launches in the same 2 mixed steps
(8,793 -> 8,445), the same GPU time; the layer end alone, forward and backward, 0.66-0.92 ms
against PyTorch's 0.64-0.91 at a mixed step's sizes; end to end inside the spread. So it stays
opt-in.

:func:`add_norm_reference` is the same function in PyTorch: the CPU path and the reference the
kernels are tested against (tests/model/test_add_norm_triton.py). The sum and its norm are
computed in fp32 (the bias unrounded: the addmm epilogue rounded ``f + bias`` to bf16), as
``F.rms_norm`` of the widened sum, and rounded once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .banked_kernels import HAS_TRITON, tl, triton

if HAS_TRITON:

    @triton.jit
    def _sum_norm(x, f, b, w, r, c, D, s_x, s_f, eps, HAS_F: tl.constexpr,
                  HAS_B: tl.constexpr):
        """Rows r, columns c: s = x + f + b, its rstd [RB] and y_hat = s * rstd [RB, BD]
        (fp32; columns D.. zero), and the weight [BD]."""
        m = (c < D)[None, :]
        rr = r.to(tl.int64)[:, None]
        s = tl.load(x + rr * s_x + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_F:
            s += tl.load(f + rr * s_f + c[None, :], mask=m, other=0.0).to(tl.float32)
        if HAS_B:
            s += tl.load(b + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
        rstd = 1.0 / tl.sqrt(tl.sum(s * s, 1) / D + eps)
        wv = tl.load(w + c, mask=c < D, other=0.0).to(tl.float32)
        return s * rstd[:, None], rstd, wv

    @triton.jit
    def _add_norm_fwd(x, f, b, w, y, yl, M, D, s_x, s_f, eps, RB: tl.constexpr,
                      BD: tl.constexpr, HAS_F: tl.constexpr, HAS_B: tl.constexpr,
                      HAS_YL: tl.constexpr):
        """y [M, D] (x's dtype) and yl [M, D] (the low dtype) of one block of RB rows."""
        r = tl.program_id(0) * RB + tl.arange(0, RB)
        r = tl.minimum(r, M - 1)  # the last block's extra rows redo row M-1 (same values)
        c = tl.arange(0, BD)
        yh, _, wv = _sum_norm(x, f, b, w, r, c, D, s_x, s_f, eps, HAS_F, HAS_B)
        out = yh * wv[None, :]
        dst = r.to(tl.int64)[:, None] * D + c[None, :]
        m = (c < D)[None, :]
        tl.store(y + dst, out.to(y.dtype.element_ty), mask=m)
        if HAS_YL:
            tl.store(yl + dst, out.to(yl.dtype.element_ty), mask=m)

    @triton.jit
    def _add_norm_bwd(x, f, b, w, g, gl, dx, df, part, M, D, s_x, s_f, s_g, s_gl, eps, nprog,
                      RB: tl.constexpr, BD: tl.constexpr, HAS_F: tl.constexpr,
                      HAS_B: tl.constexpr, HAS_G: tl.constexpr, HAS_GL: tl.constexpr,
                      HAS_DF: tl.constexpr):
        """dx (x's dtype) = df (f's dtype; HAS_DF: f's dtype is not x's) = the sum's
        gradient, for the row blocks pid, pid + nprog, ...; part[pid] = this program's column
        sums [2, D]: the sum's gradient (the bias's) and grad * y_hat (the weight's)."""
        pid = tl.program_id(0)
        c = tl.arange(0, BD)
        m = (c < D)[None, :]
        acc_b = tl.zeros([BD], dtype=tl.float32)
        acc_w = tl.zeros([BD], dtype=tl.float32)
        for blk in range(pid, tl.cdiv(M, RB), nprog):
            r = blk * RB + tl.arange(0, RB)
            live = (r < M)[:, None]
            r = tl.minimum(r, M - 1)
            rr = r.to(tl.int64)[:, None]
            yh, rstd, wv = _sum_norm(x, f, b, w, r, c, D, s_x, s_f, eps, HAS_F, HAS_B)
            gy = tl.zeros([RB, BD], dtype=tl.float32)
            if HAS_G:
                gy += tl.load(g + rr * s_g + c[None, :], mask=m, other=0.0).to(tl.float32)
            if HAS_GL:
                gy += tl.load(gl + rr * s_gl + c[None, :], mask=m, other=0.0).to(tl.float32)
            gy = tl.where(live, gy, 0.0)  # a repeated row counts once in the column sums
            dyh = gy * wv[None, :]
            ds = rstd[:, None] * (dyh - yh * (tl.sum(dyh * yh, 1) / D)[:, None])
            dst = rr * D + c[None, :]
            tl.store(dx + dst, ds.to(dx.dtype.element_ty), mask=m & live)
            if HAS_DF:
                tl.store(df + dst, ds.to(df.dtype.element_ty), mask=m & live)
            acc_b += tl.sum(ds, 0)
            acc_w += tl.sum(gy * yh, 0)
        base = part + pid.to(tl.int64) * 2 * D
        tl.store(base + c, acc_b, mask=c < D)
        tl.store(base + D + c, acc_w, mask=c < D)


def _wide(dt: torch.dtype) -> torch.dtype:
    """The dtype the sum and its norm are computed in: fp32 for bf16/fp16, else dt's own."""
    return torch.float32 if dt in (torch.bfloat16, torch.float16) else dt


def add_norm_reference(x: Tensor, f: Tensor | None, bias: Tensor | None, weight: Tensor,
                       eps: float, low: torch.dtype) -> tuple[Tensor, Tensor]:
    """y = rms_norm(x + f + bias) * weight in x's dtype, and y in ``low`` (y itself when low is
    x's dtype): x [..., D] (the stream), f [..., D] (any float dtype) or None, bias or None,
    weight [D]. The sum and the norm in fp32 for bf16/fp16 operands (as :class:`RMSNorm` of the
    decoder), rounded once; autocast off (explicit dtypes)."""
    wide = _wide(x.dtype)
    with torch.autocast(x.device.type, enabled=False):
        s = x.to(wide)
        if f is not None:
            s = s + f.to(wide)
        if bias is not None:
            s = s + bias.to(wide)
        y = F.rms_norm(s, (x.shape[-1],), weight.to(wide), eps)
    out = y.to(x.dtype)
    return out, (out if low == x.dtype else y.to(low))


def _sms(device: torch.device) -> int:
    """Most programs of the backward (a program loops over the row blocks past them): 128 per
    SM on CUDA (about one row block each at a mixed step's sizes; 4 per SM ran the layer end
    at 1.17 ms forward and backward against PyTorch's 0.92, 128 per SM at 0.64: GPU_NOTES,
    P102), 4 elsewhere (the interpreter runs them one by one)."""
    if device.type != "cuda":
        return 4
    return 128 * torch.cuda.get_device_properties(device).multi_processor_count


def _warps(RB: int, BD: int) -> int:
    """4 warps for rows of 1,024 columns, 2 below (the fastest of 2, 4 and 8 on the H200 for
    768- and 384-wide rows, P102)."""
    return 4 if BD >= 1024 else 2


_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


def _refusal(x: Tensor, f: Tensor | None) -> str | None:
    """Why the kernels cannot take these operands (on any device: the interpreter runs them on
    CPU tensors), or None."""
    if not HAS_TRITON:
        return "Triton is not installed"
    if not (x.dim() == 2 and x.stride(1) == 1 and x.dtype in _FLOATS
            and 0 < x.shape[1] <= 8192):
        return (f"x must be rows [M, D <= 8192] of unit column stride in bf16/fp16/fp32; got "
                f"{tuple(x.shape)} {x.dtype} with strides {x.stride()}")
    if f is not None and not (f.shape == x.shape and f.stride(1) == 1 and f.dtype in _FLOATS):
        return (f"f must be rows of x's shape {tuple(x.shape)} of unit column stride in "
                f"bf16/fp16/fp32; got {tuple(f.shape)} {f.dtype} with strides {f.stride()}")
    return None


def add_norm_triton_ok(x: Tensor, f: Tensor | None) -> bool:
    """Whether :class:`AddNormTriton` serves these operands: CUDA, 2-D rows of unit column
    stride, floats up to fp32, a row that fits one tile."""
    return x.is_cuda and _refusal(x, f) is None


class AddNormTriton(torch.autograd.Function):
    """Same contract as :func:`add_norm_reference` (x [M, D], f [M, D] or None, bias or None,
    weight [D]), one kernel forward, one (+ the partial sums' reduction) backward. Returns
    y alone when ``low`` is x's dtype (the stream is already low: one output, one write)."""

    @staticmethod
    def forward(ctx, x: Tensor, f: Tensor | None, bias: Tensor | None, weight: Tensor,
                eps: float, low: torch.dtype):
        M, D = x.shape
        pair = low != x.dtype
        y = torch.empty_like(x, memory_format=torch.contiguous_format)
        yl = torch.empty(M, D, device=x.device, dtype=low) if pair else y
        BD = triton.next_power_of_2(D)
        RB = max(1, min(16, 4096 // BD))
        ff = x if f is None else f  # (unread without HAS_F)
        b = weight if bias is None else bias
        if M:
            _add_norm_fwd[(triton.cdiv(M, RB),)](
                x, ff, b, weight, y, yl, M, D, x.stride(0), ff.stride(0), eps, RB=RB, BD=BD,
                HAS_F=f is not None, HAS_B=bias is not None, HAS_YL=pair,
                num_warps=_warps(RB, BD))
        ctx.save_for_backward(x, ff, b, weight)
        ctx.flags = (f is not None, bias is not None, pair)
        ctx.eps, ctx.tile = eps, (RB, BD)
        return (y, yl) if pair else y

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        x, f, b, w = ctx.saved_tensors
        has_f, has_b, pair = ctx.flags
        g, gl = grads if pair else (grads[0], None)
        M, D = x.shape
        RB, BD = ctx.tile
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        sep = has_f and f.dtype != x.dtype  # f's gradient in its own dtype: a second write
        df = torch.empty_like(f, memory_format=torch.contiguous_format) if sep else dx
        g, gl = (None if t is None else t if t.stride(-1) == 1 else t.contiguous()
                 for t in (g, gl))
        nprog = max(1, min(triton.cdiv(max(M, 1), RB), _sms(x.device)))
        part = x.new_empty(nprog, 2, D, dtype=torch.float32)
        if M:
            _add_norm_bwd[(nprog,)](
                x, f, b, w, x if g is None else g, x if gl is None else gl, dx, df, part, M, D,
                x.stride(0), f.stride(0), 0 if g is None else g.stride(0),
                0 if gl is None else gl.stride(0), ctx.eps, nprog, RB=RB, BD=BD, HAS_F=has_f,
                HAS_B=has_b, HAS_G=g is not None, HAS_GL=gl is not None, HAS_DF=sep,
                num_warps=_warps(RB, BD))
        else:
            part.zero_()
        sums = part.sum(0)  # [2, D]: the bias's and the weight's gradients
        return (dx, df if has_f else None, sums[0].to(b.dtype) if has_b else None,
                sums[1].to(w.dtype), None, None)


def add_norm(x: Tensor, f: Tensor | None, bias: Tensor | None, weight: Tensor,
             eps: float | None, low: torch.dtype, kernel: bool | None = None
             ) -> tuple[Tensor, Tensor]:
    """``rms_norm(x + f + bias) * weight`` in x's dtype and the same in ``low`` (see
    :func:`add_norm_reference`; the second is the first when low is x's dtype). ``eps`` None
    is the computing dtype's (fp32's for bf16 x: as :class:`~.decoder.RMSNorm`). ``kernel``:
    the Triton kernels (None: where :func:`add_norm_triton_ok`; True on operands they cannot
    take raises ValueError saying why)."""
    eps = torch.finfo(_wide(x.dtype)).eps if eps is None else eps
    if kernel is None:
        kernel = add_norm_triton_ok(x, f)
    elif kernel and (why := _refusal(x, f)) is not None:
        raise ValueError(f"add_norm's kernels: {why}")
    if not kernel:
        return add_norm_reference(x, f, bias, weight, eps, low)
    out = AddNormTriton.apply(x, f, bias, weight, eps, low)
    return out if low != x.dtype else (out, out)
