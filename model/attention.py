"""Banked causal linear attention with write-only decay.

Linear attention ("Transformers are RNNs", Katharopoulos et al. 2020) keeps, per head, a state
``S = sum_s phi(k_s) v_s^T`` and a normaliser ``z = sum_s phi(k_s)``; the output for a query is
``phi(q) S / (phi(q) . z)``. Here the state is split over N memory *banks* (per layer, per head):

* write: each token picks banks with probabilities ``w = softmax(write logits)`` and a retention
  ``g = sigmoid(decay logit)``. Bank n becomes ``S_n <- a_n S_n + w_n phi(k) v^T`` with
  ``a_n = 1 - w_n (1 - g)``: a bank decays only in proportion to how much it is written to, and a
  bank written with probability 0 is left exactly as it was.
* read: ``r = softmax(read logits)`` selects a superposition ``sum_n r_n S_n`` (and of the
  normalisers) that the query attends to. Reading never changes a bank.

A token writes before it reads, so it always sees itself. Numerics: everything from the feature
map on runs in fp32 with autocast off; ``phi = elu + 1 > 0`` makes the normaliser positive, and
``num / (den + eps)`` bounds both the output (by max |v|) and its gradient; the retention bias is
initialised near 1 (``decay_init``) so memories last hundreds of writes.

Reading of 003 ("the memories are banked, not defined per layer"): every layer selects among N
banks by probability, so the banks, not the layers, are the unit of storage; but each layer keeps
its own pool of N banks. One pool shared by all layers would make layer l at step t read what
layer l+1 wrote at step t-1, a nonlinear recurrence through time that has no parallel (chunked)
form; per-layer pools keep training parallel within a chunk, which the fast kernel relies on.

Two forms compute the same function: :meth:`BankedAttention.forward` (parallel within chunks of
``chunk`` steps, recurrent across chunks) and :meth:`BankedAttention.step` (one step).
Memory per layer: ``S`` [B, H, N, D, D] and ``z`` [B, H, N, D], fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention_gates_triton import KernelGatesTriton, gates_triton_ok
from .attention_io import KernelGates, KernelQKV, KernelRows, KernelRowsPacked
from .attention_io_triton import KernelQKVTriton, qkv_triton_ok
from .banked_triton import _save_blocks, banked_attention_triton, triton_supports
from .config import AttentionConfig
from .rows import Rows, as_rows, dense, head_index, undense


def upcast(t: Tensor) -> Tensor:
    """fp16/bf16 -> fp32; fp32 and fp64 (gradient checks) are kept as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def feature_map(x: Tensor) -> Tensor:
    """Positive kernel feature map ``elu(x) + 1``."""
    return F.elu(x) + 1.0


def bank_write(S: Tensor, z: Tensor, k: Tensor, v: Tensor, w: Tensor, g: Tensor
               ) -> tuple[Tensor, Tensor]:
    """Write one step. S [B,H,N,D,E], z [B,H,N,D], k [B,H,D], v [B,H,E], w [B,H,N], g [B,H]."""
    a = 1.0 - w * (1.0 - g[..., None])  # [B,H,N]; 1 where w == 0
    S = a[..., None, None] * S + w[..., None, None] * k[:, :, None, :, None] * v[:, :, None, None, :]
    z = a[..., None] * z + w[..., None] * k[:, :, None, :]
    return S, z


def bank_read(S: Tensor, z: Tensor, q: Tensor, r: Tensor, eps: float) -> Tensor:
    """Read one step (pure: S and z are not modified). q [B,H,D], r [B,H,N] -> [B,H,E]."""
    num = torch.einsum("bhn,bhd,bhnde->bhe", r, q, S)
    den = torch.einsum("bhn,bhd,bhnd->bh", r, q, z)
    return num / (den[..., None] + eps)


def kernel_path(q: Tensor, v: Tensor, chunk: int) -> bool:
    """Whether the attention runs the Triton kernels (CUDA, shapes they take). A function of its
    own so that the CPU step bench (tools/bench_train_ops.py) can route the CPU through the
    kernels' code path with a stand-in for the kernels."""
    return q.is_cuda and triton_supports(q, v, chunk)


class BankedAttention(nn.Module):
    """Multi-head banked linear attention on width ``d`` (the decoder's core width)."""

    def __init__(self, cfg: AttentionConfig, d: int) -> None:
        super().__init__()
        self.cfg = cfg
        H, D, N = cfg.heads, cfg.head_dim, cfg.banks
        self.qkv = nn.Linear(d, 3 * H * D)
        self.select = nn.Linear(d, 2 * H * N + H)  # read logits, write logits, retention logit
        self.out = nn.Linear(H * D, d)
        with torch.no_grad():
            self.select.bias[2 * H * N:].fill_(cfg.decay_init)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-example shapes of this layer's memory (fp32)."""
        H, D, N = self.cfg.heads, self.cfg.head_dim, self.cfg.banks
        return {"S": (H, N, D, D), "z": (H, N, D)}

    def _project(self, x: Tensor, mask: Tensor | None,
                 bt: tuple[int, int] | Rows | None = None):
        """x [B,T,d] -> q,k [B,H,T,D] (fp32), v [B,H,T,D] (the projection's dtype: bf16 under
        autocast), r,w [B,H,T,N], g [B,H,T] (fp32). With ``bt``, x is rows [M, d]: ``(B, T)``
        B*T steps then padding rows, or a :class:`~.rows.Rows` (dense or packed)."""
        rows = as_rows(bt)
        B, T = (rows.B, rows.T) if rows is not None else x.shape[:2]
        H, D, N = self.cfg.heads, self.cfg.head_dim, self.cfg.banks
        qkv, sel = self.qkv(x), self.select(x)
        if rows is not None:  # on the [B, T] grid (packed: padding steps zero)
            qkv, sel = dense(qkv, rows), dense(sel, rows)
        # only q, k are widened (the feature map runs in fp32); v goes to the kernel in the
        # projection's dtype: widening it and casting it back was two lossless [B*T, H*D]
        # passes forward and two in backward per layer. One split: its backward is one cat.
        qk, v = qkv.view(B, T, 3, H, D).split([2, 1], dim=2)
        q, k = feature_map(upcast(qk)).permute(2, 0, 3, 1, 4)  # [B,H,T,D] each
        v = v.squeeze(2).transpose(1, 2)
        sel = upcast(sel).view(B, T, -1)
        r = sel[..., :H * N].view(B, T, H, N).softmax(-1).transpose(1, 2)
        w = sel[..., H * N:2 * H * N].view(B, T, H, N).softmax(-1).transpose(1, 2)
        # retention >= 1e-6 keeps log a finite (a = 1 - w (1 - g) >= g) even for saturated logits
        g = torch.sigmoid(sel[..., 2 * H * N:]).clamp(min=1e-6).transpose(1, 2)
        if mask is not None:  # padded steps write nothing, so the memory passes through them
            w = w * mask[:, None, :, None].to(w.dtype)
        return q, k, v, r, w, g

    def forward(self, x: Tensor, S: Tensor, z: Tensor, mask: Tensor | None = None,
                bt: tuple[int, int] | Rows | None = None,
                out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Chunked parallel form. x [B,T,d] -> y [B,T,d], new S, new z. With ``bt`` (``(B, T)``
        or a :class:`~.rows.Rows`) x is rows [M, d] (see :meth:`_project`) and so is y (rows past
        the steps hold no step: the output bias only).
        ``out``: where the kernels may write the new S, z (the slots of a packed state; see
        :func:`~.banked_triton.banked_attention_triton`)."""
        probe = x.new_empty(0, self.cfg.head_dim)  # q's and v's head width (E = D here)
        if kernel_path(probe, probe, self.cfg.chunk):
            return self._forward_kernels(x, S, z, mask, bt, out)
        q, k, v, r, w, g = self._project(x, mask, bt)  # projections may run under autocast
        B, H, T, D = q.shape
        with torch.autocast(device_type=x.device.type, enabled=False):
            o, S, z = self._mix(q, k, v, r, w, g, S, z)  # [B,H,T,D]
        o = o.transpose(1, 2).reshape(B, T, H * D)  # [B,T,H*D]
        if bt is not None:  # back to the rows
            o = undense(o.reshape(B * T, H * D), as_rows(bt), x.shape[0])
        return self.out(o.to(x.dtype)), S, z  # autocast applies again here

    def _forward_kernels(self, x: Tensor, S: Tensor, z: Tensor, mask: Tensor | None,
                         bt: tuple[int, int] | Rows | None,
                         out: tuple[Tensor, Tensor] | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`forward` through the Triton kernels: q, k, v made in the kernels' layout
        (attention_io.KernelQKV: bf16, time padded to whole kernel blocks) and o taken back to
        rows (KernelRows), one pass each way instead of chains of casts, pads and copies.
        Packed rows (:mod:`.rows`) go to the grid in the same passes (the Triton QKV kernel,
        the output's gather), the gates through :func:`~.rows.dense`."""
        lay = as_rows(bt)
        B, T = (lay.B, lay.T) if lay is not None else x.shape[:2]
        H, D, N, C = self.cfg.heads, self.cfg.head_dim, self.cfg.banks, self.cfg.chunk
        rows = x if bt is not None else x.reshape(B * T, x.shape[-1])  # [M, d]
        step = C * _save_blocks(C)
        Tp = -(-T // step) * step  # whole kernel blocks: the kernel wrapper pads nothing
        qkv, sel = self.qkv(rows), self.select(rows)  # [M, 3HD], [M, 2HN+H]
        packed = lay is not None and lay.packed
        with torch.autocast(device_type=x.device.type, enabled=False):
            fused = self.cfg.fused_io and qkv_triton_ok(qkv, Tp, D)
            if fused:
                q, k, v = KernelQKVTriton.apply(qkv, B, T, Tp, H, D, lay if packed else None)
            else:
                q, k, v = KernelQKV.apply(dense(qkv, lay) if packed else qkv, B, T, Tp, H, D)
            # q, k, v [B,H,Tp,D] bf16
            if self.cfg.fused_io and gates_triton_ok(sel, Tp):
                r, w, g = KernelGatesTriton.apply(sel, mask, B, T, Tp, H, N,
                                                  lay if packed else None)
            else:
                r, w, g = KernelGates.apply(dense(sel, lay) if packed else sel, mask, B, T, Tp,
                                            H, N)
            # r, w [B,H,Tp,N], g [B,H,Tp] fp32
            o, S, z = banked_attention_triton(q, k, v, r, w, g, S, z, self.cfg.eps, C, out)
            if packed:  # [M, H*E]
                o = KernelRowsPacked.apply(o, head_index(lay, H, Tp), lay.n, rows.shape[0])
            else:
                o = KernelRows.apply(o, T, rows.shape[0])
        y = self.out(o.to(x.dtype))  # autocast applies again here
        return (y if bt is not None else y.view(B, T, -1)), S, z

    def _mix(self, q: Tensor, k: Tensor, v: Tensor, r: Tensor, w: Tensor, g: Tensor, S: Tensor,
             z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The attention itself, autocast off: the Triton kernels on CUDA where the shapes suit
        them (banked_triton.py, bf16 operands, fp32 states), else this chunk loop (fp32)."""
        eps, C = self.cfg.eps, self.cfg.chunk
        if kernel_path(q, v, C):
            lp = torch.bfloat16
            return banked_attention_triton(q.to(lp), k.to(lp), v.to(lp), r, w, g, S, z, eps, C)
        v = upcast(v)  # the CPU path computes in fp32
        if S is None:  # no incoming memory (first blocks): empty banks
            B, H, _, D = q.shape
            N = r.shape[-1]
            S, z = q.new_zeros(B, H, N, D, v.shape[-1]), q.new_zeros(B, H, N, D)
        # log a = log(1 - w (1 - g)) >= log g > -inf: safe to cumulate in log space
        la = torch.log1p(-w * (1.0 - g[..., None]))  # [B,H,T,N]
        outs = []
        for t0 in range(0, q.shape[2], C):
            sl = slice(t0, min(q.shape[2], t0 + C))
            o, S, z = self._chunk(q[:, :, sl], k[:, :, sl], v[:, :, sl], r[:, :, sl],
                                  w[:, :, sl], la[:, :, sl], S, z, eps)
            outs.append(o)
        return torch.cat(outs, dim=2), S, z

    @staticmethod
    def _chunk(q, k, v, r, w, la, S, z, eps):
        """One chunk of c steps: q,k,v [B,H,c,D], r,w,la [B,H,c,N], S [B,H,N,D,D], z [B,H,N,D]."""
        c = la.cumsum(dim=2)  # [B,H,c,N] inclusive log-decay from the chunk start
        Tc = q.shape[2]
        causal = torch.ones(Tc, Tc, dtype=torch.bool, device=q.device).tril()
        diff = c[:, :, :, None, :] - c[:, :, None, :, :]  # [B,H,t,s,N] = log prod_{s<u<=t} a_u
        diff = diff.masked_fill(~causal[None, None, :, :, None], float("-inf"))
        # decay-weighted bank overlap between reader t and writer s
        G = (r[:, :, :, None, :] * w[:, :, None, :, :] * diff.exp()).sum(-1)  # [B,H,t,s]
        A = (q @ k.transpose(-1, -2)) * G  # [B,H,t,s], >= 0
        rc = r * c.exp()  # [B,H,c,N]: read weight on the chunk-start memory
        num = A @ v + torch.einsum("bhtn,bhtd,bhnde->bhte", rc, q, S)
        den = A.sum(-1) + torch.einsum("bhtn,bhtd,bhnd->bht", rc, q, z)
        o = num / (den[..., None] + eps)  # [B,H,c,D]
        cT = c[:, :, -1]  # [B,H,N]
        wd = w * (cT[:, :, None, :] - c).exp()  # [B,H,c,N]: write weight decayed to chunk end
        S = cT.exp()[..., None, None] * S + torch.einsum("bhtn,bhtd,bhte->bhnde", wd, k, v)
        z = cT.exp()[..., None] * z + torch.einsum("bhtn,bhtd->bhnd", wd, k)
        return o, S, z

    def step(self, x: Tensor, S: Tensor, z: Tensor, mask: Tensor | None = None
             ) -> tuple[Tensor, Tensor, Tensor]:
        """Recurrent form, one step. x [B,d] -> y [B,d], new S, new z."""
        m = None if mask is None else mask[:, None]
        q, k, v, r, w, g = self._project(x[:, None], m)
        with torch.autocast(device_type=x.device.type, enabled=False):
            S, z = bank_write(S, z, k[:, :, 0], upcast(v[:, :, 0]), w[:, :, 0], g[:, :, 0])
            o = bank_read(S, z, q[:, :, 0], r[:, :, 0], self.cfg.eps)  # [B,H,D]
        return self.out(o.reshape(x.shape[0], -1).to(x.dtype)), S, z
