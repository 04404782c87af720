"""The decoder layer's time-parallel parts as two functions for ``torch.compile`` (CUDA).

A :class:`~blocklm.model.decoder.BottleneckLayer` runs, around the banked attention kernel, ~50
small ATen ops forward and ~80 backward per call (casts, slices, pads, softmaxes, the feature map,
norms, GELU, the concatenation): 12 layers x ~3 batches per optimizer step made ~9,700 kernels
and ~250 ms of autograd-engine host time per text step on the H200 (device call thru-final),
with casts, slice/pad backwards and norms ~120 ms of its ~305 ms of GPU time. Here the parts
before the attention (:func:`layer_pre`) and after it (:func:`layer_post`) are plain functions
of tensors with explicit bf16 casts, so Inductor can fuse each into a few kernels around the
matrix products (one compiled graph for every layer and batch: rows, batch and length are
dynamic) and autograd sees one node per part instead of dozens.

Same function as the eager layer: the eager layer under bf16 autocast casts the linears' inputs
and weights to bf16, normalises the core in fp32, computes the gates in fp32 and keeps the
residual stream in the input's dtype; so do these (tests compare both, values and gradients).
The attention's inputs come out in its kernel layout, time padded to whole chunks (padded steps
write nothing: w = 0, g = 1), so the kernel wrapper neither pads nor copies them.

Opt-in (``DecoderConfig.compile_layers``): on the H200 the `small` text step got slower with it
(154k vs 172k tokens/s, GPU_NOTES thru-A). The step is host-bound, and a compiled call with
dynamic shapes (guards, the AOTAutograd wrapper, Triton launches from Python) costs about as
much host time as the eager ops it replaces. It should pay once replayed as CUDA graphs over a
few static row/length buckets.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


def _cast(t: Tensor | None, dt: torch.dtype) -> Tensor | None:
    return None if t is None else t.to(dt)


def make_pre(heads: int, head_dim: int, banks: int, eps: float | None, lp: torch.dtype,
             step: int):
    """The part before the attention for one layer configuration (constants in a closure: as
    arguments a dynamic compile would make them symbols and guard on their relations)."""
    H, D, N = heads, head_dim, banks

    def layer_pre(x: Tensor, down_w: Tensor, down_b: Tensor, norm_w: Tensor, qkv_w: Tensor,
                  qkv_b: Tensor, sel_w: Tensor, sel_b: Tensor, mask: Tensor):
        """x [M >= B*T, d_model] (rows B*T.. are padding), mask [B,T] -> xb [M, d_model] (x in
        ``lp``), u [M, d_core] (``lp``), q, k, v [B,H,Tp,D] (``lp``; q, k feature-mapped),
        r, w [B,H,Tp,N], g [B,H,Tp] (fp32), Tp = T rounded up to whole ``step``s; steps >= T
        and masked steps write nothing."""
        B, T = mask.shape
        Tp = (T + step - 1) // step * step
        with torch.autocast(device_type=x.device.type, enabled=False):  # casts are explicit
            xb = x.to(lp)
            u = F.linear(xb, down_w.to(lp), _cast(down_b, lp))  # [M, d_core]
            un = F.rms_norm(u.float(), (u.shape[-1],), norm_w, eps).to(lp)  # fp32 statistics
            qkv = F.linear(un, qkv_w.to(lp), _cast(qkv_b, lp))[:B * T]  # [B*T, 3HD]
            sel = F.linear(un, sel_w.to(lp), _cast(sel_b, lp))[:B * T].float()  # [B*T, 2HN+H]
            qkv = qkv.float().view(B, T, 3, H, D)
            pad = Tp - T
            qk = (F.elu(qkv[:, :, :2]) + 1.0).to(lp)  # [B,T,2,H,D]: feature map phi = elu + 1
            q = F.pad(qk[:, :, 0].transpose(1, 2), (0, 0, 0, pad)).contiguous()  # [B,H,Tp,D]
            k = F.pad(qk[:, :, 1].transpose(1, 2), (0, 0, 0, pad)).contiguous()
            v = F.pad(qkv[:, :, 2].to(lp).transpose(1, 2), (0, 0, 0, pad)).contiguous()
            sel = sel.view(B, T, -1)
            r = sel[..., :H * N].view(B, T, H, N).softmax(-1)
            w = sel[..., H * N:2 * H * N].view(B, T, H, N).softmax(-1)
            # retention >= 1e-6 keeps log a finite (a = 1 - w (1 - g) >= g) for saturated logits
            g = torch.sigmoid(sel[..., 2 * H * N:]).clamp(min=1e-6)  # [B,T,H]
            w = w * mask[:, :, None, None].to(w.dtype)  # padded steps write nothing
            r = F.pad(r.transpose(1, 2), (0, 0, 0, pad)).contiguous()  # [B,H,Tp,N]
            w = F.pad(w.transpose(1, 2), (0, 0, 0, pad)).contiguous()
            g = F.pad(g.transpose(1, 2), (0, pad), value=1.0).contiguous()  # [B,H,Tp]
            return xb, u, q, k, v, r, w, g
    return layer_pre


def make_post(eps: float | None, lp: torch.dtype):
    """The part after the attention (see :func:`make_pre`)."""

    def layer_post(x: Tensor, xb: Tensor, u: Tensor, o: Tensor, out_w: Tensor, out_b: Tensor,
                   ff1_w: Tensor, ff1_b: Tensor, ff2_w: Tensor, ff2_b: Tensor, norm_w: Tensor,
                   mask: Tensor) -> Tensor:
        """Attention output o [B,H,Tp,E] -> layer output [M, d_model] in x's dtype:
        ``rmsnorm(x + ff([u + out(o), x]))``; rows B*T.. are padding (finite, never read)."""
        T = mask.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):  # casts are explicit
            B, H, _, E = o.shape
            M = x.shape[0]
            a = o[:, :, :T].transpose(1, 2).reshape(B * T, H * E).to(lp)
            a = F.pad(a, (0, 0, 0, M - B * T))  # [M, H*E]
            c = u + F.linear(a, out_w.to(lp), _cast(out_b, lp))  # [M, d_core]
            f = F.linear(F.gelu(F.linear(torch.cat([c, xb], -1), ff1_w.to(lp),
                                         _cast(ff1_b, lp))),
                         ff2_w.to(lp), _cast(ff2_b, lp))  # [M, d_model]
            y = x + f
            wide = y.float() if y.dtype in (torch.float16, torch.bfloat16) else y
            return F.rms_norm(wide, (y.shape[-1],), norm_w, eps).to(y.dtype)
    return layer_post


# dims that vary from call to call (rows, batch, length); every other dim (widths, heads) is
# static: a compile with every dim dynamic guards on chance equalities (head_dim == Tp) and
# recompiles when they break
_PRE_DYN = {0: (0,), 8: (0, 1)}  # x rows; mask batch, length
_POST_DYN = {0: (0,), 1: (0,), 2: (0,), 3: (0, 2), 11: (0, 1)}  # x, xb, u rows; o B, Tp; mask


def dynamic_dims(fn, dims: dict[int, tuple[int, ...]]):
    """``fn`` that marks ``dims`` of its tensor arguments dynamic before calling (sizes 0 and 1
    stay specialised: a batch of one gets its own graph)."""
    def run(*args):
        for i, ds in dims.items():
            for d in ds:
                if args[i].shape[d] > 1:
                    torch._dynamo.mark_dynamic(args[i], d)
        return fn(*args)
    return run


@functools.cache
def functions(form: str, heads: int, head_dim: int, banks: int, eps_core: float | None,
              eps: float | None, lp: torch.dtype, step: int):
    """(pre, post) for a layer configuration: ``form`` "eager" (plain functions) or a
    ``torch.compile`` backend ("inductor"; "aot_eager" in CPU tests), compiled once per
    process with rows, batch and length dynamic (one graph serves every layer and batch)."""
    pre, post = make_pre(heads, head_dim, banks, eps_core, lp, step), make_post(eps, lp)
    if form == "eager":
        return pre, post
    return (dynamic_dims(torch.compile(pre, backend=form), _PRE_DYN),
            dynamic_dims(torch.compile(post, backend=form), _POST_DYN))
