"""The chunk runner of the stack's graphs with one kernel per ponder iteration (stack_ctrl.py).

:class:`CtrlRunner` has :class:`blocklm.model.stack_graph.EagerRunner`'s interface (a chunk of U
decoder steps forward, and its recompute + backward), so stack_graph.py captures it as CUDA
graphs the same way. Per decoder step it runs ``max_steps`` forward kernels (no PyTorch ops in
between); a chunk's backward recomputes the chunk's states with the same kernels (keeping each
iteration's input state), then runs one backward kernel per iteration, last first, and forms the
controller's weight gradients with one matmul per weight over all the chunk's iterations.

The read each step outputs (of the state after its last iteration) is the read its next step's
first iteration computes of the same state: the kernels store it there, and only the chunk's last
step needs a read kernel of its own (stack_fused.py). Its gradient enters that first iteration's
backward beside the controller's.

With the ring (the default), what the backward reads of a chunk fits one flat fp32 buffer
(:meth:`CtrlRunner.saved_numel`: the ring at the chunk's end, each iteration's input strengths,
running, left and head, the Linear inputs, e_new, the pushed and the overwritten cells), which the
kernels write as they go: :meth:`CtrlRunner.forward_saved` keeps it from the forward, so
:meth:`CtrlRunner.backward_saved` runs no recompute (a third of the stack's kernel launches in a
training step); :meth:`CtrlRunner.backward` fills it by a recompute from the checkpoint instead.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import stack_ctrl, stack_fused
from .stack import ProcessingStack


def _params(stack: ProcessingStack) -> list[Tensor]:
    # stack_graph.stack_params' order: ctrl, act, val (weight, bias)
    return [stack.ctrl.weight, stack.ctrl.bias, stack.act.weight, stack.act.bias,
            stack.val.weight, stack.val.bias]


class CtrlRunner:
    """One chunk forward / recompute + backward by the per-iteration kernels.

    ``autocast``: the caller's state (stack_graph._Autocast); bf16 autocast rounds where the
    eager path's Linear layers would (``LOWP``); fp16 autocast is not supported. ``ring``
    (``StackConfig.ring``): inside the chunk the cells are a ring with a head per example (a
    push writes one row instead of shifting [K,W]); the chunk's input and output states are
    top-first as everywhere else (the ring starts at head 0 and is rotated back at the end)."""

    def __init__(self, stack: ProcessingStack, autocast, U: int, ring: bool | None = None
                 ) -> None:
        if autocast.enabled and autocast.dtype != torch.bfloat16:
            raise ValueError(f"fused_ctrl supports bf16 autocast only, not {autocast.dtype}")
        self.stack, self.autocast, self.U = stack, autocast, U
        self.ring = bool(stack.cfg.ring if ring is None else ring)
        # the saved path's iterations in one launch per chunk (stack_chunk.py), where the
        # batch's programs fit the GPU at once (see _one_launch)
        self.persistent = self.ring and bool(stack.cfg.persistent)
        self.lowp = bool(autocast.enabled)
        self.grads = [torch.zeros_like(p) for p in _params(stack)]

    def zero_grads(self) -> None:
        for g in self.grads:
            g.zero_()

    def _weights(self) -> list[Tensor]:
        ws = [p.detach() for p in _params(self.stack)]
        if self.lowp:  # bf16 copies of the matrices: what autocast multiplies, half the bytes
            ws[0], ws[2], ws[4] = (ws[i].to(torch.bfloat16) for i in (0, 2, 4))
        return ws

    def _one_launch(self, like: Tensor) -> bool:
        """Whether a chunk of ``like``'s batch runs as one launch: with ``persistent``, where
        its programs (one per example) fit the GPU's SMs at once. H200 (GPU_NOTES P37), ms per
        step forward + backward: 20 and 64 examples 0.067 -> 0.061 and 0.084 -> 0.075 in one
        launch, 300 examples (more programs than SMs, in waves) 0.205 -> 0.218: per iteration
        there. On the CPU (Triton's interpreter, tests) every batch fits."""
        if not self.persistent:
            return False
        if like.is_cuda:
            return like.shape[0] <= torch.cuda.get_device_properties(like.device
                                                                     ).multi_processor_count
        return True

    @property
    def saves(self) -> bool:
        """Whether a chunk's backward can run from a buffer kept by :meth:`forward_saved` (the
        ring only: without it every iteration's input cells [B,K,W] would have to be kept)."""
        return self.ring

    def saved_numel(self, B: int, U: int) -> int:
        """fp32 elements of one chunk's saved buffer (B padded examples, U steps)."""
        return saved_numel(self.stack.cfg, B, U)

    def _views(self, flat: Tensor, B: int, U: int) -> dict[str, Tensor]:
        """The saved buffer's fields as views (``hd`` reinterpreted as int32)."""
        out, at = {}, 0
        for name, shape in _saved_fields(self.stack.cfg, B, U):
            n = math.prod(shape)
            t = flat[at:at + n]
            out[name] = (t.view(torch.int32) if name == "hd" else t).view(shape)
            at += n
        return out

    def _states(self, e, r, V, s, keep: bool, flat: Tensor | None = None):
        """Run the chunk's iterations. Returns (reads, accs, es, V, s) and, with ``keep``
        (without the ring), the inputs of every iteration (lists of e, running, V, s, left
        (None: zero), head) and what the backward kernels and the weight gradients need
        (X = [e, read], e_new, v). With the ring a kept chunk goes into ``flat``, the saved
        buffer (``keep`` implied), and ``None, None`` is returned for the rest."""
        if keep and self.ring and flat is None:
            raise ValueError("with the ring a chunk is kept in its saved buffer (forward_saved)")
        cfg = self.stack.cfg
        B, U, H = e.shape
        K, W, ms = V.shape[1], V.shape[2], cfg.max_steps
        opts = stack_ctrl.launch_opts(B, K, W, H)
        pre_e = bool(opts.pop("PRE_E", 1))
        grid = (triton_cdiv(B, opts["G"]),)
        ws = self._weights()
        pe = self._pre_e(e, ws[0]) if pre_e else e  # e: an unused pointer
        reads, accs, es = e.new_empty(B, U, W), e.new_empty(B, U, W), torch.empty_like(e)
        n = U * ms
        sv = self._views(flat, B, U) if flat is not None else None
        keep = keep or sv is not None
        if sv is not None:
            saved = (sv["x"], sv["en"], sv["vn"])
        else:
            saved = (e.new_empty(n, B, H + W), e.new_empty(n, B, H), e.new_empty(n, B, W)) \
                if keep else (e, e, e)  # unused pointers when not kept
        kept = [[], [], [], [], [], []]
        hd = torch.zeros(B, dtype=torch.int32, device=V.device) if self.ring else s  # s: unused
        if sv is not None:  # the ring and the first iteration's inputs live in the buffer
            sv["ring"].copy_(V)
            sv["s"][0].copy_(s)
            sv["hd"][0].zero_()
            V, s, hd = sv["ring"], sv["s"][0], sv["hd"][0]
        elif self.ring:  # the ring, written in place (V is the caller's); head 0: same layout
            V = V.clone()
        one = sv is not None and self._one_launch(e)
        if one:  # the whole chunk in one launch
            from . import stack_chunk  # (imports triton)
            scr = e.new_empty(max(ms - 1, 1), B, H)  # e between a step's iterations
            stack_chunk.forward(grid, e, r, accs, ws, es, scr, sv, reads, pe, B, U, K, W, H,
                                float(cfg.epsilon), ms, self.lowp, pre_e, opts)
            V, s, hd = sv["ring"], sv["s"][n], sv["hd"][n]
        for u in range(0 if one else U):
            ein, rin, acc, left = e[:, u], r[:, u], accs[:, u], None
            for i in range(ms):
                j = u * ms + i
                last = i == ms - 1
                if keep and sv is None:
                    for lst, t in zip(kept, (ein, rin, V, s, left, hd)):
                        lst.append(t)
                eo = es[:, u] if last else e.new_empty(B, H)
                Vo = V if self.ring else torch.empty_like(V)
                if sv is not None:  # this iteration's outputs: the next one's saved inputs
                    so, hdo, lefto, runo = (sv[k][j + 1] for k in ("s", "hd", "left", "run"))
                else:
                    so, hdo = torch.empty_like(s), torch.empty_like(hd) if self.ring else hd
                    lefto, runo = s.new_empty(B), s.new_empty(B)
                read = reads[:, u - 1] if (i == 0 and u > 0) else eo  # eo: an unused pointer
                X, EN, VN = (t[j] for t in saved) if keep else saved
                BOT = sv["bot"][j] if sv is not None else e  # e: an unused pointer
                stack_ctrl._iter_fwd[grid](
                    ein, ein.stride(0), V, s, rin, rin.stride(0), acc, acc.stride(0),
                    V if left is None else left, *ws, eo, eo.stride(0), Vo, so, acc,
                    acc.stride(0), lefto, runo, read, read.stride(0), X, EN, VN, hd, hdo, BOT,
                    pe[:, u], pe.stride(0), B, K, W, H, float(cfg.epsilon), FIRST=i == 0,
                    SAVE_READ=i == 0 and u > 0, SAVE=keep, LOWP=self.lowp, RING=self.ring,
                    PRE_E=pre_e and i == 0, **opts)
                ein, rin, V, s, left, hd = eo, runo, Vo, so, lefto, hdo
        if self.ring:  # back to top-first: cell k of example b is row (head_b + k) mod K
            V = V.gather(1, _rows(hd, K)[..., None].expand(-1, -1, W))
        with torch.no_grad():
            reads[:, U - 1] = stack_fused.fused_read(V, s)
        if sv is not None:
            return (reads, accs, es, V, s), None, None
        return (reads, accs, es, V, s), kept, saved

    def forward(self, e, r, V, s):
        """e [B,U,Hd], r [B,U], V [B,K,W], s [B,K] -> reads, accs, last e's, V, s (no grad)."""
        return self._states(e.contiguous(), r.contiguous(), V.contiguous(), s.contiguous(),
                            keep=False)[0]

    def forward_saved(self, e, r, V, s, flat):
        """:meth:`forward`, also writing what the chunk's backward needs into ``flat``
        ([:meth:`saved_numel`] fp32; the returned s is a view into it)."""
        return self._states(e.contiguous(), r.contiguous(), V.contiguous(), s.contiguous(),
                            keep=True, flat=flat)[0]

    def backward(self, e, r, V, s, g_read, g_acc, g_e, g_V, g_s):
        """Recompute the chunk from its checkpoint and back-propagate: -> de [B,U,Hd], dV, ds
        at the chunk's start; parameter gradients are added to ``self.grads``."""
        if self.saves:  # the recompute fills the same buffer the forward could have kept
            flat = e.new_empty(self.saved_numel(e.shape[0], e.shape[1]))
            self.forward_saved(e, r, V, s, flat)
            return self.backward_saved(r, flat, g_read, g_acc, g_e, g_V, g_s)
        e, r, V, s = (t.contiguous() for t in (e, r, V, s))
        out, (_, rin, Vs, ss, lefts, hds), (X, EN, VN) = self._states(e, r, V, s, keep=True)
        # the last step's read is a kernel of its own: its gradient joins the final state's
        gVr, gsr = stack_fused._Read.backward(_Ctx(out[3], out[4]), g_read[:, -1])
        return self._backward(r, g_read, g_acc, g_e, g_V + gVr, g_s + gsr, rin, Vs, ss, lefts,
                              hds, X, EN, VN, None, None)

    def backward_saved(self, r, flat, g_read, g_acc, g_e, g_V, g_s):
        """Back-propagate a chunk from the buffer its :meth:`forward_saved` (or a recompute)
        wrote: r [B,U] the chunk's running, the output gradients as in :meth:`backward`. The
        buffer's ring is turned back in place (it serves one backward)."""
        r = r.contiguous()
        B, U = r.shape
        K, W = self.stack.cfg.depth, self.stack.cfg.width
        sv = self._views(flat, B, U)
        n = sv["en"].shape[0]
        ring, hd = sv["ring"], sv["hd"][n]
        V = ring.gather(1, _rows(hd, K)[..., None].expand(-1, -1, W))  # the chunk's end, top-first
        gVr, gsr = stack_fused._Read.backward(_Ctx(V, sv["s"][n]), g_read[:, U - 1])
        g_V = (g_V + gVr).contiguous()
        g_V = torch.empty_like(g_V).scatter_(1, _rows(hd, K)[..., None].expand(-1, -1, W), g_V)
        return self._backward(r, g_read, g_acc, g_e, g_V, g_s + gsr, sv["run"], None, sv["s"],
                              sv["left"], sv["hd"], sv["x"], sv["en"], sv["vn"], sv["bot"], ring)

    def _backward(self, r, g_read, g_acc, g_e, g_V, g_s, rin, Vs, ss, lefts, hds, X, EN, VN,
                  BOT, ring):
        """The backward kernels, last iteration first, and the weight gradients. Per iteration
        j: its input running (``rin``; a step's first iteration reads r), cells (``Vs``, or
        ``ring`` turned back in place with ``BOT``), strengths, left, head; g_V arrives laid out
        as the ring when ``ring`` is given."""
        cfg = self.stack.cfg
        g_read, g_acc, g_e = (t.contiguous() for t in (g_read, g_acc, g_e))
        B, U, H = g_e.shape
        K, W, ms = g_V.shape[1], g_V.shape[2], cfg.max_steps
        opts = stack_ctrl.launch_opts(B, K, W, H, backward=True)
        pre_e = bool(opts.pop("PRE_E", 1))
        grid = (triton_cdiv(B, opts["G"]),)
        wc, _, wa, ba, wv, _ = self._weights()
        wct = wc.t().contiguous()  # [Hd+W, Hd]: the backward's products reduce along rows
        n = U * ms
        GPRE, GLG, GVP = g_e.new_empty(n, B, H), g_e.new_empty(n, B, 3), g_e.new_empty(n, B, W)
        de = torch.empty_like(g_e)
        zero = g_s.new_zeros(B)
        g_left, g_en = zero, None
        one = ring is not None and self._one_launch(g_e)
        if one:  # the whole chunk in one launch
            from . import stack_chunk  # (imports triton)
            gss = g_s.new_empty(2, B, K)
            gss[0].copy_(g_s)
            sv = {"s": ss, "run": rin, "left": lefts, "en": EN, "vn": VN, "hd": hds, "bot": BOT}
            stack_chunk.backward(grid, ring, sv, r, wct, wa, ba, wv, g_e, g_V, gss, g_acc,
                                 g_s.new_empty(ms, B), zero, g_read, de, g_e.new_empty(ms, B, H),
                                 GPRE, GLG, GVP, B, U, K, W, H, ms, self.lowp, pre_e, opts)
            g_s = gss[n % 2]
        for j in reversed(range(0 if one else n)):
            u, i = divmod(j, ms)
            geo = g_e[:, u] if i == ms - 1 else g_en
            gleft = zero if i == ms - 1 else g_left
            gacc = g_acc[:, u]
            gread = g_read[:, u - 1] if (i == 0 and u > 0) else gacc  # gacc: an unused pointer
            ge = de[:, u] if i == 0 else g_e.new_empty(B, H)
            gV = g_V if ring is not None else torch.empty_like(g_V)
            gs, glefti = torch.empty_like(g_s), g_s.new_empty(B)
            rj = r[:, u] if i == 0 else rin[j]  # a step's first iteration runs on its input
            left = lefts[j]
            stack_ctrl._iter_bwd[grid](
                ring if ring is not None else Vs[j], ss[j], rj, rj.stride(0),
                zero if left is None else left, EN[j], VN[j], wct, wa, ba, wv, geo,
                geo.stride(0), g_V, g_s, gacc, gacc.stride(0), gleft, gread, gread.stride(0),
                ge, ge.stride(0), gV, gs, glefti, GPRE[j], GLG[j], GVP[j], hds[j],
                g_s if BOT is None else BOT[j], B, K, W, H, FIRST=i == 0,
                HAS_GREAD=i == 0 and u > 0, LOWP=self.lowp, RING=ring is not None,
                PRE_E=pre_e and i == 0, **opts)
            g_V, g_s, g_left, g_en = gV, gs, glefti, ge
        if pre_e:  # d/d e of each step's first iteration through ctrl: one matmul per chunk
            with torch.autocast(g_e.device.type, enabled=False):
                first = GPRE.view(U, ms, B, H)[:, 0]  # [U,B,H] (bf16 values under LOWP)
                de += _round(first @ wc[:, :H].float(), self.lowp).transpose(0, 1)
        # weight gradients: one matmul per weight over the chunk's n * B rows (fp32 sums)
        GPRE, GLG, GVP = (t.view(n * B, -1) for t in (GPRE, GLG, GVP))
        X = X.reshape(n * B, -1)
        EN = _round(EN.reshape(n * B, -1), self.lowp)  # act and val multiplied bf16(e_new)
        for gw, gb, gout, inp in zip(self.grads[0::2], self.grads[1::2], (GPRE, GLG, GVP),
                                     (X, EN, EN)):
            gw.addmm_(gout.t(), inp)
            gb.add_(gout.sum(0))
        return de, g_V, g_s

    def _pre_e(self, e: Tensor, wc: Tensor) -> Tensor:
        """The embedding's part of ctrl([e, read]) for each step's first iteration, whose e
        is the step's input (it reads no state): e [B,U,Hd] -> [B,U,Hd] fp32, one matmul per
        chunk instead of a serial loop over Hd in every first-iteration kernel. Under LOWP the
        operands are bf16 values, so the fp32 product sums exact products as the kernel did."""
        with torch.autocast(e.device.type, enabled=False):
            return _round(e, self.lowp) @ wc[:, :e.shape[-1]].float().t()


def _saved_fields(cfg, B: int, U: int) -> list[tuple[str, tuple]]:
    """A chunk's saved buffer: (name, shape) in order. Rows n of s / run / left / head are the
    chunk's last iteration's outputs; a step's first-iteration rows of run / left are unused
    (it runs on the step's input running, with nothing left yet)."""
    K, W, H, n = cfg.depth, cfg.width, cfg.hidden, U * cfg.max_steps
    return [("ring", (B, K, W)), ("s", (n + 1, B, K)), ("x", (n, B, H + W)),
            ("en", (n, B, H)), ("vn", (n, B, W)), ("bot", (n, B, W)), ("run", (n + 1, B)),
            ("left", (n + 1, B)), ("hd", (n + 1, B))]


def saved_numel(cfg, B: int, U: int) -> int:
    """fp32 elements of one chunk's saved buffer for a stack of config ``cfg``."""
    return sum(math.prod(shape) for _, shape in _saved_fields(cfg, B, U))


def _round(x: Tensor, lowp: bool) -> Tensor:
    """autocast's bf16 rounding, kept in fp32 (the kernels' ``_rb``)."""
    return x.to(torch.bfloat16).float() if lowp else x


class _Ctx:
    """The saved tensors stack_fused._Read.backward reads (its kernel, without autograd)."""

    def __init__(self, V: Tensor, s: Tensor) -> None:
        self.saved_tensors = (V, s)


def _rows(hd: Tensor, K: int) -> Tensor:
    """The ring's row of each top-first cell: hd [B] (int32) -> [B,K] int64."""
    return (hd.long()[:, None] + torch.arange(K, device=hd.device)) % K


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def available(t: Tensor) -> bool:
    """Whether the per-iteration kernels can run on ``t`` (triton and fp32; CUDA, or the CPU
    under TRITON_INTERPRET=1 in the tests)."""
    return stack_ctrl.triton is not None and t.dtype == torch.float32


def ctrl_runner_for(stack: ProcessingStack):
    """A ``runner_for`` of eager :class:`CtrlRunner`\\ s (CPU tests under Triton's interpreter;
    ungraphed on CUDA)."""
    from .stack_graph import _Autocast
    return lambda B, U, like: CtrlRunner(stack, _Autocast(like.device.type), U)
