"""Shared machinery of the 8-bit modes (image, audio): one decoder step per patch/frame.

A step carries ``E`` 8-bit elements (a patch's sub-pixels, a frame's mu-law samples). The step's
input embedding is a linear map of the previous step's elements; its elements are predicted from
the decoder output by a small *within-step autoregressive* head, so the likelihood is exact and
discrete: ``p(step) = prod_e p(x_e | h, x_<e)`` with

    logits_e = mlp(ctx(h) + pos_e + sum_{j<e} val[j, x_j])        [B,T,E,256]

(the sum over earlier elements is a cumulative sum, so training is parallel over e; sampling
walks e = 0..E-1). Elements outside the content (padding, absent channels) are fixed at 0, never
count in the loss and are forced to 0 when sampling.

The head's arithmetic lives in :mod:`.patch_fused` as plain functions of tensors; the training
loss runs it per checkpointed slice of steps, ``torch.compile``d on CUDA (``compile_head``), or,
on CUDA with Triton and TMA (``fused_head``, the default), per slice as the two kernels of
:mod:`.patch_triton`, which save only a few floats per element instead of being checkpointed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .batch import BlockBatch
from .config import SampleConfig
from .patch_fused import element_logits, low_precision, slice_bits_fn
from .patch_kernel import head_bits, runs_here
from .sampling import sample_logits
from .support import ModeSupport, grid_rows

# A compiled slice indexes its tensors with int32 while each has under 2**31 elements; the first
# slice whose logits reach 2**31 makes Inductor compile the graph again with int64 indexes
# (~1 s on the H200, inside a timed window: gpu_mixed4's largest audio batch, 1,008 clips x 65
# steps, 65,536 grid rows x 128 elements x 256 values = 2**31 exactly; GPU_NOTES, P103-P108)
INDEX_LIMIT = 2**31 - 1


class ElementHead(nn.Module):
    """Within-step autoregressive head over E elements of a 256-value vocabulary."""

    def __init__(self, E: int, d_model: int, width: int, vocab: int = 256) -> None:
        super().__init__()
        self.E = E
        self.ctx = nn.Linear(d_model, width)
        self.pos = nn.Parameter(torch.randn(E, width) * 0.02)
        self.val = nn.Parameter(torch.randn(E, vocab, width) * 0.02)
        self.out = nn.Sequential(nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, vocab))

    def params(self) -> tuple[Tensor, ...]:
        """The head's weights in :func:`.patch_fused.element_logits`'s order (the value table
        viewed as [E*vocab, w])."""
        V = self.val.shape[1]
        return (self.ctx.weight, self.ctx.bias, self.pos, self.val.view(self.E * V, -1),
                self.out[1].weight, self.out[1].bias, self.out[3].weight, self.out[3].bias)

    def logits(self, h: Tensor, values: Tensor) -> Tensor:
        """h [B,T,d], values [B,T,E] long (teacher forcing) -> logits [B,T,E,V]."""
        return element_logits(h, values, *self.params(), lp=None)  # autocast decides

    def sample(self, h: Tensor, emask: Tensor, cfg: SampleConfig,
               generator: torch.Generator | None) -> Tensor:
        """h [B,d], emask [B,E] bool -> elements [B,E] long (0 where emask is False)."""
        c = self.ctx(h)[:, None, :] + self.pos  # [B,E,w]
        acc = torch.zeros_like(c[:, 0])
        out = torch.zeros(h.shape[0], self.E, dtype=torch.long, device=h.device)
        for e in range(self.E):
            v = sample_logits(self.out(c[:, e] + acc), cfg, generator)  # [B]
            v = torch.where(emask[:, e], v, torch.zeros_like(v))
            out[:, e] = v
            acc = acc + self.val[e, v].to(acc.dtype)
        return out


class PatchSupport(ModeSupport):
    """Base of supports whose steps are patches/frames of 8-bit elements."""

    vocab = 256

    def __init__(self, d_model: int, E: int, head_width: int, loss_chunk: int,
                 compile_head: bool = False, fused_head: bool = False) -> None:
        super().__init__(d_model)
        self.elements_per_step = E
        self.loss_chunk = loss_chunk
        self.compile_head = compile_head
        self.fused_head = fused_head
        # the loss slices' form: None = on CUDA the Triton kernels if fused_head and they run
        # there (patch_kernel.runs_here), else Inductor if compile_head, else eager; "triton", or
        # "eager" / "inductor" / "aot_eager" (tests; patch_fused.slice_bits_fn) force one
        self.head_form: str | None = None
        self.inp = nn.Linear(E, d_model)
        self.cond_in = nn.Linear(self.cond_dims, d_model)
        self.head = ElementHead(E, d_model, head_width)

    def element_mask(self, shape: tuple[int, ...], t: int) -> Tensor:
        """Which of step t's E elements exist in a block of this shape: [E] bool."""
        raise NotImplementedError

    def embed_elements(self, inputs: Tensor, cond: Tensor) -> Tensor:
        """[B,T,E] long, [B,C] -> [B,T,d_model]."""
        x = inputs.to(self.inp.weight.dtype) / 127.5 - 1.0
        return self.inp(x) + self.cond_in(cond.to(x.dtype))[:, None, :]

    def distribution(self, h: Tensor, batch: BlockBatch) -> Tensor:
        """[B,T,d] -> logits [B,T,E,256], each element conditioned on the earlier ones."""
        return self.head.logits(h, batch.targets)

    def _form(self, h: Tensor) -> str:
        if self.head_form is not None:
            return self.head_form
        if (h.is_cuda and self.fused_head
                and runs_here(h.device, self.head.ctx.out_features, low_precision("cuda"))):
            return "triton"
        return "inductor" if h.is_cuda and self.compile_head else "eager"

    def warm_head(self, device, autocast: bool = True, grad: bool = True) -> None:
        """Compile the loss slices' graph now (CUDA, ``compile_head``): the first compile,
        forward and backward, takes ~10-20 s, which would otherwise stall the first image or
        audio batch mid-window. Runs one small slice (``grad``: forward and backward, as in
        training, else the no-grad graph of evaluation); parameter gradients are not touched
        (only the input's is asked for)."""
        device = torch.device(device)
        # h in the dtype training gives it: under bf16 autocast the decoder's stream is bf16,
        # and a graph compiled for fp32 h was never used (the first image and audio batches
        # compiled theirs again, ~6-7 s each on the H200: GPU_NOTES P72)
        dt = torch.bfloat16 if autocast else torch.float32
        h = torch.zeros(2, 3, self.inp.out_features, device=device, dtype=dt, requires_grad=grad)
        if self._form(h) == "eager":
            return
        targets = torch.zeros(2, 3, self.elements_per_step, dtype=torch.long, device=device)
        mask = torch.ones(2, 3, self.elements_per_step, dtype=torch.bool, device=device)
        try:
            with torch.set_grad_enabled(grad), torch.autocast(device.type, dtype=torch.bfloat16,
                                                              enabled=autocast):
                bits = self._slice_bits(h, targets, mask)
            if grad:
                torch.autograd.grad(bits.sum(), h)
        except Exception as e:  # a machine without a working compiler: say what to turn off
            flag = "fused_head" if self._form(h) == "triton" else "compile_head"
            raise RuntimeError(
                f"compiling the {self.name} head's loss ({self._form(h)}) failed: "
                f"{type(e).__name__}: {e}; to run the head another way, set "
                f"model.modes.{self.name}.{flag}=false") from e

    def _slice_bits(self, h: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
        """h [B,t,d] -> bits [B] (:func:`.patch_fused.slice_bits`); on CUDA the B*t rows padded
        to the decoder's row grid (the head's matrices see repeating shapes, see
        ModeSupport.bits); padding rows have target 0 and no element in the mask."""
        B, t, d = h.shape
        n = B * t
        if self._form(h) == "triton":  # any row count; the kernels hold the rows' tensors
            return head_bits(h.reshape(n, d), targets.reshape(n, -1), mask.reshape(n, -1),
                             *self.head.params(), lp=low_precision(h.device.type)).view(B, t).sum(1)
        m = grid_rows(n, h)
        hp = nn.functional.pad(h.reshape(n, d), (0, 0, 0, m - n))
        tg = nn.functional.pad(targets.reshape(n, -1), (0, 0, 0, m - n))
        mk = torch.cat([mask.reshape(n, -1), mask.new_zeros(m - n, mask.shape[-1])])
        fn = slice_bits_fn(self._form(h), low_precision(h.device.type))
        return fn(hp, tg, mk, *self.head.params())[:n].view(B, t).sum(1)

    def slice_steps(self, B: int, T: int, like: Tensor) -> int:
        """Steps per loss slice of a [B, T] batch: ``loss_chunk``, fewer where a slice's logits
        ([rows, E, 256], its rows padded to the row grid on CUDA) would reach
        :data:`INDEX_LIMIT` elements, so that every slice fits the compiled graph's int32
        indexes (and the fused kernels' int32 row offsets)."""
        c = max(1, min(self.loss_chunk, T))
        per_row = self.elements_per_step * self.vocab
        while c > 1 and grid_rows(B * c, like) * per_row > INDEX_LIMIT:
            c -= 1
        return c

    def bits(self, h: Tensor, batch: BlockBatch, rows=None) -> tuple[Tensor, Tensor]:
        """Bits in slices of ``loss_chunk`` steps (:meth:`slice_steps`), each checkpointed, so
        the [B,T,E,256] logits of a large image never exist at once (forward or saved for
        backward). The Triton form saves a few floats per element, not logits: its slices are
        not checkpointed (they bound the backward's buffers). ``rows`` is not used: the head
        runs on the [B, T] grid (image batches have no padding steps, audio ~3%)."""
        T, c = h.shape[1], self.slice_steps(h.shape[0], h.shape[1], h)
        if T <= c:
            return self._slice_bits(h, batch.targets, batch.mask), batch.elements
        total = h.new_zeros(h.shape[0], dtype=torch.float32)
        fused = self._form(h) == "triton"
        for t0 in range(0, T, c):
            part = (h[:, t0:t0 + c], batch.targets[:, t0:t0 + c], batch.mask[:, t0:t0 + c])
            if fused:
                total = total + self._slice_bits(*part)
            else:
                # no random op in a slice: no RNG state to stash and restore per slice (with
                # it, a first compile inside the slice on a machine whose CUDA was not yet
                # initialised was refused: "device state was initialized in the forward pass")
                total = total + checkpoint(self._slice_bits, *part, use_reentrant=False,
                                           preserve_rng_state=False)
        return total, batch.elements

    def sample(self, h: Tensor, shapes: list, t: int, cfg: SampleConfig,
               generator: torch.Generator | None) -> Tensor:
        """Step t's elements [B,E], drawn element by element."""
        emask = torch.stack([self.element_mask(s, t) for s in shapes]).to(h.device)
        return self.head.sample(h, emask, cfg, generator)
