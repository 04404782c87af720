"""The shared recurrent decoder and its state.

Per decoder step the input embedding (d_model, from a mode support) goes through ``layers``
bottleneck layers and then the processing stack:

    layer:  u = down(x)                        [B,T,d_core]   the bottleneck
            c = u + attn(rmsnorm(u))           [B,T,d_core]   banked linear attention
            x = rmsnorm(x + ff([c, x]))        [B,T,d_model]  concat with the large embedding
    stack:  h = rmsnorm(x + stack_step(x))     [B,T,d_model]  one stack step per time step

The *state* handed between blocks is one fp32 tensor per example, [B, state_size], holding every
layer's bank memories, the stack (cells and strengths) and the summary (the decoder output of the
block's last step, read by the next-mode and shape heads). Per-example states stack along dim 0,
so the dispatcher can batch any blocks of any examples. :class:`StateLayout` names the slices.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from . import layer_fused
from .add_norm_triton import add_norm, add_norm_triton_ok
from .attention import BankedAttention
from .banked_triton import _save_blocks, banked_attention
from .config import DecoderConfig
from .rows import Rows, from_rows, packed_rows, to_rows
from .stack import ProcessingStack
from .stack_block import stack_block
from .state_pack import pack_into


class StateLayout:
    """Named slices of the flat per-example state vector."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = dict(shapes)
        self.offsets: dict[str, tuple[int, int]] = {}
        o = 0
        for name, shp in self.shapes.items():
            n = math.prod(shp)
            self.offsets[name] = (o, o + n)
            o += n
        self.size = o

    def unpack(self, state: Tensor) -> dict[str, Tensor]:
        """[B, size] -> name -> [B, *shape] (views).

        One ``split``, not a slice per part: in backward each slice filled a zero [B, size]
        gradient and added it (25 full-state passes per batch in the ``small`` decoder, ~20 ms
        of GPU time per text step); the split's backward is one concatenation."""
        B = state.shape[0]
        sizes = [b - a for a, b in self.offsets.values()]
        rest = state.shape[1] - self.size  # callers may hand a longer row (layout first):
        parts = state.split(sizes + [rest] if rest else sizes, dim=1)  # its tail is "rest"
        out = {n: p.view(B, *self.shapes[n]) for n, p in zip(self.offsets, parts)}
        if rest:
            out["rest"] = parts[-1]
        return out

    def new_rows(self, B: int, tail: Tensor | None, device) -> tuple[Tensor, dict[str, Tensor]]:
        """Packed rows to fill, [B, size (+ tail's k)] fp32, and their slots by name (views, as
        :meth:`unpack`): the layers write their memories there (:mod:`.state_pack`)."""
        k = 0 if tail is None else tail.shape[1]
        buf = torch.empty(B, self.size + k, device=device, dtype=torch.float32)
        return buf, self.unpack(buf)

    def pack_into(self, buf: Tensor, parts: dict[str, Tensor],
                  tail: Tensor | None = None) -> Tensor:
        """:meth:`pack` into ``buf`` from :meth:`new_rows`: the parts already in their slots
        are not copied (:class:`.state_pack.PackInto`). fp64 parts take :meth:`pack`."""
        flat = [parts[n] for n in self.shapes] + ([] if tail is None else [tail])
        if any(f.dtype == torch.float64 for f in flat):
            return self.pack(parts, tail)
        spans = tuple(self.offsets.values())
        if tail is not None:
            spans += ((self.size, self.size + tail.shape[1]),)
        return pack_into(buf, spans, flat)

    def pack(self, parts: dict[str, Tensor], tail: Tensor | None = None) -> Tensor:
        """name -> [B, *shape] -> [B, size] (fp32 unless given fp64); ``tail`` [B, k] is
        appended (one concatenation for the whole row)."""
        B = next(iter(parts.values())).shape[0]
        flat = [parts[n].reshape(B, -1) for n in self.shapes] + ([] if tail is None else [tail])
        dtype = torch.float64 if any(f.dtype == torch.float64 for f in flat) else torch.float32
        return torch.cat([f.to(dtype) for f in flat], dim=1)


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` that normalises in fp32 and returns the input's dtype (bf16 on CUDA:
    :func:`rms_norm_low`). Under bf16
    autocast a bf16 input with the fp32 weight cannot take PyTorch's fused kernel and runs as
    ~6 ops forward and ~10 backward per call (24 calls per batch in ``small``); the output is
    the same (the unfused path also computes in fp32, with fp32's eps, then casts back)."""

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            return rms_norm_low(x, self.normalized_shape, self.weight, self.eps)
        wide = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x  # fp64 stays
        return nn.functional.rms_norm(wide, self.normalized_shape, self.weight,
                                      self.eps).to(x.dtype)


def rms_norm_low(x: Tensor, shape, weight: Tensor, eps: float | None) -> Tensor:
    """RMS norm of a bf16/fp16 x by the fused kernel in x's dtype (CUDA: fp32 statistics inside
    the kernel; the weight rounded to x's dtype, ~1 ulp of the output at most). The fp32 route
    widened x and cast the result back: two [rows, width] passes forward and two in backward
    per call (the core norm: 12 calls per batch in ``small``; device call D4's ``bfloat16_copy``
    and ``direct_copy`` kernels). eps None is fp32's, as on that route, given explicitly: the
    result does not hang on which default a kernel takes for a bf16 input (nn.RMSNorm documents
    ``finfo(x.dtype).eps``: 2^-7 for bf16)."""
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    with torch.autocast(x.device.type, enabled=False):  # rms_norm may be on its fp32 list
        return nn.functional.rms_norm(x, shape, weight.to(x.dtype), eps)


def _low(x: Tensor) -> Tensor:
    """x in autocast's dtype (x itself without autocast, or when x is in it already: the
    stream is fp32 for text, whose embedding is a table, and bf16 for images and audio, whose
    embeddings are linear layers). An fp32 stream is cast once for both its readers (the down
    projection and the concatenation): two casts were two [M, d_model] passes forward and two
    cast-backs plus an add backward, per layer and batch."""
    dev = x.device.type
    return x.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x


def token_rows(m: int) -> int:
    """Rows the layers' matrices get for m block steps: m rounded up to a grid of ~3% steps
    (a multiple of 2^(bits(m) - 5), at least 64: under 1/16 extra). cuBLAS picks its kernel per new matrix shape
    at a host cost of ~3-5 ms (device call thru-1: the first linear of each shape in every
    batch), and B*T is new in nearly every batch; on the grid the shapes repeat."""
    step = 1 << max(6, m.bit_length() - 5)
    return -(-m // step) * step


class BottleneckLayer(nn.Module):
    """Large embedding -> core width -> banked attention -> concat -> feed-forward -> add+norm."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.down = nn.Linear(cfg.d_model, cfg.d_core)
        self.norm_core = RMSNorm(cfg.d_core)
        self.attn = BankedAttention(cfg.attention, cfg.d_core)
        self.ff = nn.Sequential(nn.Linear(cfg.d_core + cfg.d_model, cfg.d_ff), nn.GELU(),
                                nn.Linear(cfg.d_ff, cfg.d_model))
        self.norm = RMSNorm(cfg.d_model)

    def _hidden(self, u: Tensor, a: Tensor, xl: Tensor) -> Tensor:
        """The feed-forward's hidden layer on [u + a, xl] -> [..., d_ff]."""
        c = u + a  # [..., d_core]
        return self.ff[1](self.ff[0](torch.cat([c, xl.to(c.dtype)], -1)))

    def _finish(self, x: Tensor, u: Tensor, a: Tensor, xl: Tensor | None = None) -> Tensor:
        h = self._hidden(u, a, x if xl is None else xl)
        return self.norm(x + self.ff[2](h))

    def forward(self, x, S, z, mask=None, bt=None, out=None):
        """x [B,T,d_model] -> x [B,T,d_model], S, z (chunked parallel). With ``bt = (B, T)``
        x is the block's steps flattened and padded with rows, [M >= B*T, d_model] (see
        :func:`token_rows`); the output is too. ``out``: the packed state's slots for S, z
        (:meth:`BankedAttention.forward`)."""
        xl = _low(x)
        u = self.down(xl)
        a, S, z = self.attn(self.norm_core(u), S, z, mask, bt, out)
        return self._finish(x, u, a, xl), S, z

    def forward_pair(self, x, xl, S, z, mask, bt, out=None, kernel: bool | None = None):
        """:meth:`forward` on rows, carrying the stream both ways: x [M, d_model] (fp32 or,
        from a linear embedding under autocast, bf16) and ``xl``, x in autocast's dtype (None:
        cast here; x itself when x is already low) -> x, xl, S, z. The norms are
        :func:`~.add_norm_triton.add_norm`: one kernel each way on CUDA (``kernel``: force it,
        or the PyTorch reference), the layer's end with the feed-forward's bias, the residual
        add and the next layer's cast in it. Same function as :meth:`forward`."""
        xl = _low(x) if xl is None else xl
        u = self.down(xl)  # [M, d_core]
        un, _ = add_norm(u, None, None, self.norm_core.weight, self.norm_core.eps, u.dtype,
                         kernel)
        a, S, z = self.attn(un, S, z, mask, bt, out)
        ff2 = self.ff[2]
        f = nn.functional.linear(self._hidden(u, a, xl), ff2.weight)  # [M, d_model]; its
        # bias goes to add_norm
        y, yl = add_norm(x, f, ff2.bias, self.norm.weight, self.norm.eps, xl.dtype, kernel)
        return y, yl, S, z

    def forward_fused(self, x, S, z, mask, bt, form, out=None):
        """Same as :meth:`forward` with ``bt = (B, T)`` (x [M >= B*T, d_model] rows), through
        :mod:`.layer_fused`'s functions in ``form`` ("inductor" on CUDA): the layer's parts
        around the attention fused, its inputs made in the kernel's layout."""
        B, T = bt
        a = self.attn.cfg
        step = a.chunk * _save_blocks(a.chunk)  # whole kernel blocks: the kernel pads nothing
        dev = x.device.type
        lp = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        pre, post = layer_fused.functions(form, a.heads, a.head_dim, a.banks,
                                          self.norm_core.eps, self.norm.eps, lp, step)
        if mask is None:
            mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
        xb, u, q, k, v, r, w, g = pre(
            x, self.down.weight, self.down.bias, self.norm_core.weight, self.attn.qkv.weight,
            self.attn.qkv.bias, self.attn.select.weight, self.attn.select.bias, mask)
        with torch.autocast(device_type=dev, enabled=False):
            o, S, z = banked_attention(q, k, v, r, w, g, S, z, a.eps, a.chunk,
                                       out)  # o [B,H,Tp,E]
        ff1, ff2 = self.ff[0], self.ff[2]
        x = post(x, xb, u, o, self.attn.out.weight, self.attn.out.bias, ff1.weight, ff1.bias,
                 ff2.weight, ff2.bias, self.norm.weight, mask)
        return x, S, z

    def step(self, x, S, z, mask=None):
        """x [B,d_model] -> x [B,d_model], S, z (one recurrent step)."""
        u = self.down(x)
        a, S, z = self.attn.step(self.norm_core(u), S, z, mask)
        return self._finish(x, u, a), S, z


class Decoder(nn.Module):
    """Bottleneck layers + processing stack; ``forward`` (a block) and ``step`` (one step)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.norm_in = RMSNorm(cfg.d_model)
        self.grid_rows: bool | None = None  # None: pad the layers' rows (token_rows) on CUDA
        # the layers' rows hold only real steps (model/rows.py) when the step counts are given
        # and some are padding; None: cfg.packed_rows on CUDA (plain layers, not the fused form)
        self.packed_rows: bool | None = None
        # the layers through layer_fused: None = compiled on CUDA if cfg.compile_layers;
        # "eager" / "compiled" / "aot_eager" (tests) / "off" force a form
        self.fused_layers: str | None = None
        # the layers' ends through add_norm (forward_pair): None = the kernels on CUDA rows if
        # cfg.fused_add_norm; "kernel" / "reference" (PyTorch, tests) / "off" force a form
        self.add_norm: str | None = None
        self.layers = nn.ModuleList(BottleneckLayer(cfg) for _ in range(cfg.layers))
        self.stack = ProcessingStack(cfg.stack, cfg.d_model) if cfg.stack.enabled else None
        self.norm_out = nn.RMSNorm(cfg.d_model) if self.stack is not None else nn.Identity()
        shapes: dict[str, tuple[int, ...]] = {}
        for i, layer in enumerate(self.layers):
            for n, shp in layer.attn.state_shapes().items():
                shapes[f"{n}{i}"] = shp
        if self.stack is not None:
            shapes.update(self.stack.state_shapes())
        shapes["summary"] = (cfg.d_model,)
        self.layout = StateLayout(shapes)

    def initial_state(self, batch: int, device=None, dtype=torch.float32) -> Tensor:
        """Empty memories, empty stack, zero summary: [batch, state_size]."""
        return torch.zeros(batch, self.layout.size, device=device, dtype=dtype)

    def forward(self, x: Tensor, state: Tensor | dict[str, Tensor], mask: Tensor | None = None,
                tail: Tensor | None = None, summary: bool = False, pack: bool = True,
                lengths: tuple[int, ...] | list[int] | Rows | None = None):
        """A whole block. x [B,T,d_model], state [B,size] (or its ``layout.unpack``), mask [B,T]
        (True = real step; real steps form a prefix) -> outputs [B,T,d_model], state after each
        example's last real step (with ``tail`` [B,k] appended to its row); with ``summary``
        also the summary [B,d_model] as packed into the state (before the packing: a reader of
        the summary alone then does not take a gradient of the whole row). ``pack=False``: no
        state is packed (None in its place; nothing reads it: the examples' last blocks).
        ``lengths``: the mask's real steps per example as host ints (the mask's row sums): the
        layers may then run on the real steps only (:attr:`packed_rows`); outputs at padding
        steps are then zero (they are never read: the mask's steps are what counts). A
        :class:`~.rows.Rows` from :meth:`packed_layout` is taken as it is.
        """
        st = state if isinstance(state, dict) else self.layout.unpack(state)
        new: dict[str, Tensor] = {}
        x = self.norm_in(x)
        B, T, d = x.shape
        grid = self.grid_rows if self.grid_rows is not None else x.is_cuda
        form = self._fused_form(x)
        lay = lengths if isinstance(lengths, Rows) else self.packed_layout(lengths, x, mask)
        n = B * T if lay is None else lay.n  # rows that hold steps
        m = token_rows(n) if grid else n
        # the layers see [M, d] rows and bt = (B, T), or the packed rows' layout
        rows = form is not None or m != B * T or lay is not None
        bt = lay if lay is not None else (B, T) if rows else None
        # the packed state first: the attention kernels write the memories into its slots
        buf, slots = self.layout.new_rows(B, tail, x.device) if pack else (None, None)
        with record_function("blocklm:layers"):
            if lay is not None:
                x = to_rows(x, lay, m)
            elif rows:  # padding rows: finite, never read back, zero gradient
                x = nn.functional.pad(x.reshape(B * T, d), (0, 0, 0, m - B * T))
            pair = self._pair_form(x, rows) if form is None else None
            xl = None  # the stream in autocast's dtype, from the previous layer's add_norm
            for i, layer in enumerate(self.layers):
                out = None if slots is None else (slots[f"S{i}"], slots[f"z{i}"])
                if form is not None:
                    x, new[f"S{i}"], new[f"z{i}"] = layer.forward_fused(
                        x, st[f"S{i}"], st[f"z{i}"], mask, (B, T), form, out)
                elif pair is not None:
                    x, xl, new[f"S{i}"], new[f"z{i}"] = layer.forward_pair(
                        x, xl, st[f"S{i}"], st[f"z{i}"], mask, bt, out,
                        {"kernel": True, "reference": False}.get(pair))
                else:
                    x, new[f"S{i}"], new[f"z{i}"] = layer(x, st[f"S{i}"], st[f"z{i}"], mask,
                                                          bt, out)
            if lay is not None:
                x = from_rows(x, lay)
            elif rows:
                x = x[:B * T].view(B, T, d)
        if self.stack is not None:
            # the stack is a step recurrence; stack_block batches its time-parallel parts and
            # compiles the loop on CUDA
            y, new["V"], new["s"] = stack_block(self.stack, x, st["V"], st["s"], mask)
            x = self.norm_out(x + y.to(x.dtype))
        B, T = x.shape[:2]
        last = (mask.long().sum(1) - 1).clamp(min=0) if mask is not None else \
            torch.full((B,), T - 1, device=x.device)
        new["summary"] = x[torch.arange(B, device=x.device), last]
        packed = None
        if pack:
            with record_function("blocklm:pack_state"):
                packed = self.layout.pack_into(buf, new, tail)
        parts = list(new.values()) + ([] if tail is None else [tail])  # pack's dtype
        dt = torch.float64 if any(p.dtype == torch.float64 for p in parts) else torch.float32
        return (x, packed, new["summary"].to(dt)) if summary else (x, packed)

    def warm_layers(self, device, autocast: bool = True) -> None:
        """Compile the fused layers' graphs before training (CUDA): a dynamic graph is still
        specialised for batch 1 and for a length of whole kernel blocks (no time padding), and
        each compile (forward, then backward at the first backward) takes seconds; forward and
        backward on dummy batches of each kind, so no training step waits for one. Parameter
        gradients are not touched (only the input's is asked for)."""
        device = torch.device(device)
        form = self._fused_form(torch.empty(0, device=device))
        if form is None:
            return
        a = self.cfg.attention
        step = a.chunk * _save_blocks(a.chunk)
        layer = self.layers[0]  # every layer calls the same graphs
        # x in the stream's dtype in training: bf16 under autocast (a graph for fp32 x was
        # never used, every one was compiled again at the first batches: GPU_NOTES P72)
        dt = torch.bfloat16 if autocast else torch.float32
        for B, T in ((2, 3), (1, 3), (2, step), (1, step)):
            x = torch.randn(token_rows(B * T), self.cfg.d_model, device=device, dtype=dt,
                            requires_grad=True)
            st = self.layout.unpack(self.initial_state(B, device))
            mask = torch.ones(B, T, dtype=torch.bool, device=device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                y, S, _ = layer.forward_fused(x, st["S0"], st["z0"], mask, (B, T), form)
            torch.autograd.grad(y.float().sum() + S.sum(), x)

    def packed_layout(self, lengths, x: Tensor, mask: Tensor | None) -> Rows | None:
        """The packed rows of a block batch x [B,T,d] (``lengths``: its real steps per block,
        host ints), or None for the dense grid: packing on (:attr:`packed_rows`; None: the
        config's, on CUDA), the plain layers (the fused form takes the grid), step counts
        given, and some steps padding. The heads may take the same layout
        (:meth:`~.support.ModeSupport.bits`)."""
        B, T = x.shape[:2]
        on = self.packed_rows if self.packed_rows is not None else \
            self.cfg.packed_rows and x.is_cuda
        if not on or self._fused_form(x) is not None or lengths is None or mask is None:
            return None
        if len(lengths) != B:
            raise ValueError(f"{len(lengths)} step counts for a batch of {B} blocks")
        if sum(lengths) == B * T:
            return None
        return packed_rows(lengths, T, x.device)

    def _pair_form(self, x: Tensor, rows: bool) -> str | None:
        """How the layers end (:meth:`BottleneckLayer.forward_pair`): "auto" (the kernels
        where they serve the operands), "kernel", "reference", or None for :meth:`forward`."""
        mode = self.add_norm
        if mode not in (None, "kernel", "reference", "off"):
            raise ValueError(f"Decoder.add_norm is {mode!r}: expected None (auto), 'kernel', "
                             "'reference' or 'off'")
        if mode is None:
            on = self.cfg.fused_add_norm and rows and x.is_cuda and add_norm_triton_ok(x, None)
            mode = "auto" if on else "off"
        return None if mode == "off" else mode

    def _fused_form(self, x: Tensor) -> str | None:
        """The form of :mod:`.layer_fused` for this call, or None for the plain layers."""
        mode = self.fused_layers
        if mode is None:  # Inductor needs a GPU to pay (and a compiler)
            mode = "compiled" if x.is_cuda and self.cfg.compile_layers else "off"
        return {"off": None, "compiled": "inductor"}.get(mode, mode)

    def step(self, x: Tensor, state: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One step. x [B,d_model], state [B,size], mask [B] -> output [B,d_model], new state."""
        st = self.layout.unpack(state)
        new: dict[str, Tensor] = {}
        x = self.norm_in(x)
        for i, layer in enumerate(self.layers):
            x, new[f"S{i}"], new[f"z{i}"] = layer.step(x, st[f"S{i}"], st[f"z{i}"], mask)
        if self.stack is not None:
            y, new["V"], new["s"], _ = self.stack.step(x, st["V"], st["s"], mask)
            x = self.norm_out(x + y.to(x.dtype))
        summary = x if mask is None else torch.where(mask[:, None], x, st["summary"].to(x.dtype))
        new["summary"] = summary
        return x, self.layout.pack(new)
