"""The element head's loss through the kernels of :mod:`.patch_triton`: the autograd function,
its launch options and :func:`head_bits` (``ImageConfig.fused_head`` / ``AudioConfig``).

The default where it runs (:func:`runs_here`: CUDA with TMA, compute capability 9.0+, since its
weight reads and row writes go through host tensor descriptors). On the H200 it agrees with the
compiled head (bf16, every gradient) and is faster for one batch: an image batch 70-71 against
Inductor's 77 ms, an audio batch 46 against 52 (GPU_NOTES, P64). Mixed training showed no
difference outside the spread in P62-P63 (30-step windows, 193-203k tokens/s either way); at
P153's defaults it ran +5.2% (+4.6% / +6.1% on the same steps), with ~30% fewer device mallocs
a step, since no [rows, E, 256] logits of a size new to the cache are allocated.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from .banked_backward import pow2
from .patch_triton import triton

if triton is not None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    from .patch_triton import _bwd, _fwd


@dataclass(frozen=True)
class HeadKernelOpts:
    """Launch options of the two kernels (the best of P56-P60 on the H200 for each)."""

    fwd_warps: int = 4
    fwd_maxnreg: int | None = 128  # registers a thread (None: the compiler's choice)
    fwd_stages: int = 1  # software-pipeline stages of the tile loop
    # 4 programs of 4 warps an SM, each its own tile chain: 8 warps at 255 registers held the
    # SM alone (backward 48 ms of an image batch, against ~37; P60)
    bwd_warps: int = 4
    bwd_maxnreg: int | None = 128
    bwd_stages: int = 1
    tile_max: int = 32  # elements per tile at most, forward
    bwd_tile_max: int = 16  # and backward (a power of two up to tile_max)
    vocab_chunk: int = 64  # logits (and their gradient) this many values at a time
    programs_per_sm: int = 8  # each program walks ~M / programs steps

    def __post_init__(self) -> None:
        for name in ("tile_max", "bwd_tile_max", "vocab_chunk"):
            n = getattr(self, name)
            if n < 16 or pow2(n) != n:  # tensor-core operands: powers of two of 16 or more
                raise ValueError(f"HeadKernelOpts.{name} must be a power of two >= 16, got {n}")


DEFAULT_OPTS = HeadKernelOpts()


def tile_elements(E: int, tile_max: int = 32) -> int:
    """Elements per tile: E up to ``tile_max`` (at least 16, a tensor-core operand's rows)."""
    return min(tile_max, max(16, pow2(E)))


def _launch(warps: int, maxnreg: int | None) -> dict:
    return {"num_warps": warps} | ({} if maxnreg is None else {"maxnreg": maxnreg})


def _programs(M: int, device: torch.device, per_sm: int) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(M, per_sm * sms))
    return max(1, min(M, 4))


class _HeadBits(torch.autograd.Function):
    """bits [M] of the head on c [M,w] (the context projection's output)."""

    @staticmethod
    def forward(ctx, c, targets, mask, pos, val, w1, b1, w2, b2, lowp: bool,
                opts: HeadKernelOpts):
        M, WD = c.shape
        E, V = targets.shape[1], w2.shape[0]
        if pow2(WD) != WD or pow2(V) != V or WD < 16 or V < 16:
            raise ValueError(f"the fused element head needs a power-of-two width >= 16 and "
                             f"vocabulary, got width {WD}, vocabulary {V}; set "
                             f"fused_head=false for this mode")
        wt = torch.bfloat16 if lowp else torch.float32
        w1_, b1_, w2_, b2_ = (w.detach().to(wt).contiguous() for w in (w1, b1, w2, b2))
        VC = min(V, opts.vocab_chunk)
        TE = tile_elements(E, opts.tile_max)
        NT = -(-E // TE)
        TB = min(TE, tile_elements(E, opts.bwd_tile_max))  # the backward's tiles
        NB = -(-E // TB)
        if M * NB * TB >= 2**31:  # the backward's descriptors address rows in int32
            raise ValueError(f"the fused element head takes under 2**31 element rows a call, "
                             f"got {M} steps x {NB * TB}; use a smaller loss_chunk")
        P = _programs(M, c.device, opts.programs_per_sm)
        RPP = -(-M // P)
        c_, t_ = c.detach().contiguous(), targets.contiguous()
        m_ = mask.contiguous().view(torch.uint8)
        pos_, val_ = pos.detach().float().contiguous(), val.detach().float().contiguous()
        bits = torch.empty(M, dtype=torch.float32, device=c.device)
        lse = torch.empty(M, E, dtype=torch.float32, device=c.device)
        pre = torch.empty(M, NB, WD, dtype=torch.float32, device=c.device)
        desc = TensorDescriptor.from_tensor
        _fwd[(P,)](c_, t_, m_, desc(pos_, [TE, WD]), val_, desc(w1_, [WD, WD]), b1_,
                   desc(w2_, [VC, WD]), b2_, bits, lse, pre, M, E, RPP, WD=WD, V=V, TE=TE,
                   NT=NT, PT=TB, NPT=NB, VC=VC, NS=opts.fwd_stages, LOWP=lowp,
                   **_launch(opts.fwd_warps, opts.fwd_maxnreg))
        ctx.save_for_backward(c_, t_, m_, pos_, val_, w1_, b1_, w2_, b2_, lse, pre)
        ctx.meta = (lowp, TB, NB, VC, P, RPP, opts, c.dtype)
        return bits

    @staticmethod
    def backward(ctx, gbits):
        c, t, m, pos, val, w1, b1, w2, b2, lse, pre = ctx.saved_tensors
        lowp, TE, NT, VC, P, RPP, opts, cdt = ctx.meta
        M, WD = c.shape
        E, V = t.shape[1], w2.shape[0]
        EP, dev = NT * TE, c.device  # element rows a step in the buffers (rows past E unused)
        R = M * EP
        dt = torch.bfloat16 if lowp else torch.float32
        dc = torch.empty(M, WD, dtype=torch.float32, device=dev)
        dve = torch.empty(R, WD, dtype=torch.float32, device=dev)
        dl = torch.empty(R, V, dtype=dt, device=dev)
        y, x, dp1 = (torch.empty(R, WD, dtype=dt, device=dev) for _ in range(3))
        db1 = torch.empty(P, WD, dtype=torch.float32, device=dev)
        db2 = torch.zeros(P, V, dtype=torch.float32, device=dev)
        rows = [TensorDescriptor.from_tensor(b, [TE, b.shape[1] if b is not dl else VC])
                for b in (dve, dl, y, x, dp1)]
        desc = TensorDescriptor.from_tensor
        _bwd[(P,)](c, t, m, desc(pos, [TE, WD]), val, desc(w1, [WD, WD]), b1, desc(w2, [VC, WD]),
                   b2, lse, pre, gbits.float().contiguous(), dc, *rows, db1, db2, M, E, RPP,
                   WD=WD, V=V, TE=TE, NT=NT, VC=VC, NS=opts.bwd_stages, LOWP=lowp,
                   **_launch(opts.bwd_warps, opts.bwd_maxnreg))
        # rows past E (a step's last tile when TE does not divide E) have zero gradients of
        # the logits and of the first Linear, so the products may keep them; the value rows
        # may not (their index would be another element's)
        dve = dve.view(M, EP, WD)[:, :E].reshape(M * E, WD)
        # the weights' gradients: one product over all element rows each (rounded as autocast
        # rounds a bf16 Linear's weight gradient)
        dw2 = (dl.t() @ y).float()
        dw1 = (dp1.t() @ x).float()
        idx = (t + torch.arange(E, device=dev) * V).reshape(M * E)
        dval = torch.ops.aten.embedding_dense_backward(dve, idx, E * V, -1, False)
        # d pre0[m,e] = dve[m,e-1] - dve[m,e] (e >= 1) and dc[m] - dve[m,0]: the position
        # gradient (a sum over steps of d pre0) from the value rows' gradients
        s = dve.view(M, E, WD).sum(0)
        dpos = torch.cat([(dc.sum(0) - s[0])[None], s[:-1] - s[1:]])
        return (dc.to(cdt), None, None, dpos, dval, dw1, db1.sum(0), dw2, db2.sum(0), None,
                None)


def runs_here(device: torch.device, width: int, lp: torch.dtype | None) -> bool:
    """Whether the kernels run for a head of ``width`` on ``device`` in precision ``lp``: Triton
    installed, a CUDA device with TMA (compute capability 9.0+: the kernels address their tiles
    through host tensor descriptors), a power-of-two width >= 16, and fp32 or bf16."""
    return (triton is not None and device.type == "cuda" and pow2(width) == width >= 16
            and lp in (None, torch.bfloat16) and _tma(device.index))


@functools.cache
def _tma(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def head_bits(h: Tensor, targets: Tensor, mask: Tensor, ctx_w: Tensor, ctx_b: Tensor,
              pos: Tensor, val: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
              lp: torch.dtype | None, opts: HeadKernelOpts | None = None) -> Tensor:
    """:func:`.patch_fused.slice_bits` through the kernels: h [M, d], targets [M, E] (integer),
    mask [M, E] bool -> bits per row [M] fp32. ``lp``: bf16 (autocast's products) or None
    (fp32). CUDA tensors, or CPU ones under ``TRITON_INTERPRET=1`` (the tests)."""
    if triton is None:
        raise RuntimeError("the fused element head needs triton; set fused_head=false")
    if lp not in (None, torch.bfloat16):
        raise ValueError(f"the fused element head runs in fp32 or bf16, not {lp}")
    with torch.autocast(device_type=h.device.type, enabled=False):
        if lp is None:
            c = torch.nn.functional.linear(h, ctx_w, ctx_b)
        else:
            c = torch.nn.functional.linear(h.to(lp), ctx_w.to(lp), ctx_b.to(lp))
        return _HeadBits.apply(c, targets, mask, pos, val, w1, b1, w2, b2, lp is not None,
                               opts or DEFAULT_OPTS)
