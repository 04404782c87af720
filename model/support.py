"""The mode-support interface and the registry that new modes plug into.

A :class:`ModeSupport` holds everything mode-specific (design note 000): **embed** (step inputs ->
d_model embeddings), **target** (contents -> shifted inputs with a start token, targets, masks),
**distribution** (decoder outputs -> logits over the mode's own vocabulary), **loss** (bits per
element: per character, sub-pixel or audio sample) and **sample** (temperature, top-k/top-p,
adaptive temperature). A block of ``n`` decoder steps' worth of elements costs ``n + 1`` decoder
steps: step 0 consumes the start token and step t consumes step t-1's elements; the output of step
t < n predicts step t's elements and the output of step n (after the whole block was consumed) is
the block *summary* kept in the state for the next-mode and shape heads.

Each decoder step carries ``E = elements_per_step`` elements (text: 1 token; image: one patch of
sub-pixels; audio: one frame of samples), each from a vocabulary of ``vocab`` values.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .batch import BlockBatch
from .config import SampleConfig
from .rows import Rows, dense, to_rows
from .sampling import sample_logits

LN2 = math.log(2.0)


def step_index(n: Tensor) -> Tensor:
    """The step index t (0..n_i) of every block's n_i + 1 steps, concatenated: n [B] long ->
    [sum(n + 1)] long (the flat positions of text, image and audio are functions of it)."""
    steps = n + 1
    return torch.arange(int(steps.sum())) - torch.repeat_interleave(steps.cumsum(0) - steps, steps)


def sinusoid(pos: Tensor, d: int) -> Tensor:
    """Sinusoidal features of coordinates. pos [..., P] -> [..., d] (d split over P coordinates)."""
    P = pos.shape[-1]
    per = (d // P) // 2 * 2
    half = per // 2
    freq = torch.exp(-math.log(10000.0) * torch.arange(half, device=pos.device) / max(half, 1))
    ang = pos.float()[..., None] * freq  # [..., P, half]
    feats = torch.cat([ang.sin(), ang.cos()], -1).flatten(-2)  # [..., P*per]
    return nn.functional.pad(feats, (0, d - feats.shape[-1]))


class ModeSupport(nn.Module):
    """Base class of a mode support. Subclasses implement the methods that raise here."""

    name: str = "?"
    elements_per_step: int = 1
    vocab: int = 256
    position_dims: int = 1
    cond_dims: int = 0
    shape_dims: tuple[str, ...] = ()  # names of the shape entries the shape head predicts

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.d_model = d_model
        self.start_token = nn.Parameter(torch.randn(d_model) * 0.02)

    # -- shape ---------------------------------------------------------------------------------
    def shape_of(self, content) -> tuple[int, ...]:
        """The shape of one decoded content (text [n_chars], image [H,W,C], audio [frames,ch])."""
        raise NotImplementedError

    def steps(self, shape: tuple[int, ...]) -> int:
        """Decoder steps a block of this shape costs, summary step included (cost model)."""
        raise NotImplementedError

    def content_steps(self, content) -> int:
        """Exact decoder steps of one decoded content (text tokenizes; others use the shape)."""
        return self.steps(self.shape_of(content))

    def steps_of(self, contents: list) -> list[int]:
        """:meth:`content_steps` of each content (supports may count a batch faster)."""
        return [self.content_steps(c) for c in contents]

    @property
    def cost_estimated(self) -> bool:
        """Whether this support's shapes only estimate their cost: it measures a
        :meth:`cost_shape` from the content (text: its tokens)."""
        return type(self).cost_shape is not ModeSupport.cost_shape

    def cost_shape(self, content) -> tuple[int, ...] | None:
        """The shape under which a batching dispatcher should charge and bucket this content,
        when its own shape only estimates the cost (:meth:`steps` of it must equal
        :meth:`content_steps`); None (the default): the shape's cost is exact already."""
        return None

    def shape_spec(self) -> list[tuple[str, object]]:
        """Per shape entry: ("size", max) for log-binned sizes or ("choice", values)."""
        raise NotImplementedError

    def positions_of(self, shape: tuple[int, ...], T: int) -> Tensor:
        """Coordinates [T,P] of what steps 0..T-1 of a block of this shape predict."""
        raise NotImplementedError

    def cond_of(self, shape: tuple[int, ...]) -> Tensor:
        """Per-block conditioning [C] derived from the shape (known when sampling too)."""
        return torch.zeros(self.cond_dims)

    def elements_of(self, shape: tuple[int, ...]) -> int:
        """How many elements bits are reported per (characters, sub-pixels, samples)."""
        return math.prod(shape)

    # -- training ------------------------------------------------------------------------------
    def prepare(self, content):
        """Work on one block's decoded content that can be done ahead of its batch, off the
        model's thread (the trainer's dispatcher runs it in its read-ahead thread): a content
        :meth:`target` takes in place of the decoded one, with the same result. Default: the
        content as it is (text: its token ids, :class:`blocklm.model.text.Tokenized`; audio: its
        mu-law levels, :class:`blocklm.model.audio.Levels`)."""
        return content

    def encode(self, content) -> tuple[Tensor, Tensor]:
        """One content -> its steps' elements [n,E] long and their loss mask [n,E] bool."""
        raise NotImplementedError

    def target(self, contents: list, device=None) -> BlockBatch:
        """Contents -> shifted inputs with a start token, targets and masks (padded to T).

        One element per step (text: many short blocks): a few whole-batch copies
        (boolean-mask writes in row-major order equal the concatenation of the examples), not
        per-example slice writes (~10,000 small ATen ops per 300-block batch, ~75 ms of host
        time on the H200 machine). Many elements per step (images, audio: few, long blocks):
        per-example slice copies, which copy large rows faster than a masked write, into one
        uint8 tensor (the elements are 8-bit): the inputs are the targets shifted by one step,
        made on the device with the int64 copy, so the host writes and sends 1 byte per element
        instead of two int64 arrays (~190 MB for a batch of 19 480x320 images). Supports that
        implement :meth:`pack` (image, audio) write each block's elements straight into that
        tensor (pinned for a CUDA device, sent without waiting) and make the masks on the device
        from the shapes (:meth:`element_masks`): building them per block on the host held the
        H200 idle ~90 ms before each image or audio batch (GPU_NOTES.md, call P13).
        """
        shapes = [self.shape_of(c) for c in contents]
        B, E = len(contents), self.elements_per_step
        dev = torch.device(device) if device is not None else None
        packed = self.pack(contents, shapes, dev) if E > 1 else None
        if E == 1:
            vals, msk, n = self.encode_flat(contents)  # [sum n, 1], [sum n, 1], [B] steps
        elif packed is not None:
            n, targets = packed  # [B] steps, [B,T,E] uint8
        else:
            enc = [self.encode(c) for c in contents]
            n = torch.tensor([v.shape[0] for v, _ in enc], dtype=torch.long)
        T = int(n.max()) + 1
        t = torch.arange(T)
        steps = t[None, :] <= n[:, None]  # [B,T]: the start step, n element steps, a prefix
        # packed batches make their mask on the device (a host one: ~15 MB zeroed for nothing)
        mask = None if packed is not None else torch.zeros(B, T, E, dtype=torch.bool)
        if E == 1:
            inputs = torch.zeros(B, T, E, dtype=torch.long)
            targets = torch.zeros(B, T, E, dtype=torch.long)
            body = t[None, :-1] < n[:, None]  # [B,T-1]: steps that carry elements
            inputs[:, 1:][body] = vals
            targets[:, :-1][body] = vals
            mask[:, :-1][body] = msk
        elif packed is not None:  # the inputs made from the targets, the masks on the device
            inputs, mask = targets[:0], self.element_masks(shapes, T, dev)
        else:
            targets = torch.zeros(B, T, E, dtype=torch.uint8)  # 8-bit elements, widened below
            inputs = targets[:0]  # made from the targets on the device
            for i, (v, m) in enumerate(enc):
                k = v.shape[0]
                targets[i, :k], mask[i, :k] = v, m
        positions = torch.zeros(B, T, self.position_dims)
        positions[steps] = self.positions_flat(shapes, n)
        start = torch.zeros(B, T, dtype=torch.bool)
        start[:, 0] = True
        # no conditioning (text): one empty tensor, not one per block (~300 host ops a batch)
        cond = torch.zeros(B, 0) if self.cond_dims == 0 else self.cond_batch(shapes)
        elements = torch.tensor([float(self.elements_of(s)) for s in shapes])
        batch = BlockBatch(self.name, shapes, inputs, start, positions, cond, targets, mask,
                           steps, elements, tuple((n + 1).tolist())).to(device)
        if E > 1:  # step t's inputs are step t-1's elements: [B,T,E] long
            batch.targets = batch.targets.long()
            batch.inputs = nn.functional.pad(batch.targets[:, :-1], (0, 0, 1, 0))
        return batch

    def pack(self, contents: list, shapes: list, device=None
             ) -> tuple[Tensor, Tensor] | None:
        """E > 1: the batch's element steps n [B] long and elements [B, max n + 1, E] uint8
        (zeros past each block's n steps), on ``device`` or on the host (pinned for a CUDA
        device), with :meth:`element_masks` for the masks; None (the default): :meth:`target`
        encodes each block with :meth:`encode` instead. Both ways give the same batch."""
        return None

    def element_masks(self, shapes: list, T: int, device=None) -> Tensor:
        """With :meth:`pack`: which elements count [B,T,E] bool, made on ``device``."""
        raise NotImplementedError

    def cond_batch(self, shapes: list) -> Tensor:
        """:meth:`cond_of` of every shape [B,C] (supports may build it at once)."""
        return torch.stack([self.cond_of(s) for s in shapes]).view(len(shapes), self.cond_dims)

    def encode_flat(self, contents: list) -> tuple[Tensor, Tensor, Tensor]:
        """All contents' elements concatenated [sum n, E] long, their loss mask [sum n, E] bool
        and the step counts n [B] long (supports may encode a batch at once)."""
        enc = [self.encode(c) for c in contents]
        E = self.elements_per_step
        return (torch.cat([v for v, _ in enc]).to(torch.long).view(-1, E),
                torch.cat([m for _, m in enc]).to(torch.bool).view(-1, E),
                torch.tensor([v.shape[0] for v, _ in enc], dtype=torch.long))

    def positions_flat(self, shapes: list, n: Tensor) -> Tensor:
        """:meth:`positions_of` of every block's n + 1 steps, concatenated [sum(n+1), P]."""
        return torch.cat([self.positions_of(s, int(k) + 1).view(-1, self.position_dims)
                          for s, k in zip(shapes, n.tolist())]).float()

    def embed_elements(self, inputs: Tensor, cond: Tensor) -> Tensor:
        """Previous-step elements [B,T,E] long + cond [B,C] -> [B,T,d_model]."""
        raise NotImplementedError

    def embed(self, batch: BlockBatch) -> Tensor:
        """Step inputs -> embeddings [B,T,d_model] (start token, elements, positions)."""
        x = self.embed_elements(batch.inputs, batch.cond)  # [B,T,d]
        x = torch.where(batch.start[..., None], self.start_token.to(x.dtype), x)
        return x + sinusoid(batch.positions, self.d_model).to(x.dtype)

    def distribution(self, h: Tensor, batch: BlockBatch) -> Tensor:
        """Decoder outputs [B,T,d] -> logits [B,T,E,vocab] (teacher-forced within a step)."""
        raise NotImplementedError

    def loss(self, logits: Tensor, batch: BlockBatch) -> tuple[Tensor, Tensor]:
        """Bits summed per example [B] and the element count [B] they are reported per."""
        nll = nn.functional.cross_entropy(logits.float().flatten(0, -2), batch.targets.flatten(),
                                          reduction="none").view(batch.targets.shape)
        bits = (nll * batch.mask).flatten(1).sum(1) / LN2
        return bits, batch.elements

    def warm_head(self, device, autocast: bool = True, grad: bool = True) -> None:
        """Compile the loss's graphs ahead of training, where a support compiles any (the
        image and audio heads, :meth:`blocklm.model.patch.PatchSupport.warm_head`); here
        nothing to do."""

    def bits(self, h: Tensor, batch: BlockBatch, rows: Rows | None = None
             ) -> tuple[Tensor, Tensor]:
        """Decoder outputs -> (bits [B], elements [B]); supports may bound memory here.

        On CUDA the output rows are padded to the decoder's row grid (``token_rows``) as one
        [1, M] batch: the output matrix product then has a shape seen before (cuBLAS picks a
        kernel per new shape at ~3-5 ms of host time, in forward and twice in backward);
        padding rows have target 0 and are cut from the per-element losses before the mask.
        ``rows``: packed rows (:mod:`.rows`, the decoder's layout of this batch): the head runs
        on the real steps only, its bits put back on the grid to sum them per block."""
        B, T, d = h.shape
        if rows is not None and rows.packed:
            m = grid_rows(rows.n, h)
            E = batch.targets.shape[2]
            tg, mk = (t.reshape(B * T, E).index_select(0, rows.index)  # [n, E]
                      for t in (batch.targets, batch.mask))
            per = row_bits(self.distribution(to_rows(h, rows, m).view(1, m, d), batch),
                           tg[:, None], mk[:, None])  # [n] bits per real step (T = 1)
            return dense(per[:, None], rows).view(B, T).sum(1), batch.elements
        n = B * T
        m = grid_rows(n, h)
        if m == n:
            return self.loss(self.distribution(h, batch), batch)
        hp = nn.functional.pad(h.reshape(n, d), (0, 0, 0, m - n)).view(1, m, d)
        return row_bits(self.distribution(hp, batch), batch.targets, batch.mask), batch.elements

    # -- sampling ------------------------------------------------------------------------------
    def step_inputs(self, prev: Tensor | None, shapes: list, t: int, device) -> BlockBatch:
        """A one-step batch for generation step t (prev: step t-1's elements [B,E])."""
        B, E = len(shapes), self.elements_per_step
        inputs = torch.zeros(B, 1, E, dtype=torch.long) if prev is None else prev.cpu()[:, None]
        positions = torch.stack([self.positions_of(s, t + 1)[t] for s in shapes])[:, None]
        cond = torch.stack([self.cond_of(s) for s in shapes]).view(B, self.cond_dims)
        start = torch.full((B, 1), t == 0)
        none = torch.zeros(B, 1, E, dtype=torch.long)  # no targets when sampling
        real = torch.ones(B, 1, dtype=torch.bool)
        return BlockBatch(self.name, list(shapes), inputs, start, positions, cond, none,
                          none.bool(), real, torch.zeros(B)).to(device)

    def sample(self, h: Tensor, shapes: list, t: int, cfg: SampleConfig,
               generator: torch.Generator | None) -> Tensor:
        """Draw step t's elements from decoder outputs h [B,d] -> [B,E] long."""
        logits = self.distribution(h[:, None], None)[:, 0]  # [B,E,V]
        return sample_logits(logits, cfg, generator)

    def max_steps(self, shape: tuple[int, ...]) -> int:
        """Upper bound on element steps when generating a block of this shape."""
        return self.steps(shape) - 1

    def complete(self, elements: Tensor, shape: tuple[int, ...]) -> bool:
        """Whether the elements generated so far [n,E] fill the shape."""
        return elements.shape[0] >= self.max_steps(shape)

    def assemble(self, elements: Tensor, shape: tuple[int, ...]):
        """Generated elements [n,E] -> decoded content of the requested shape."""
        raise NotImplementedError


def grid_rows(n: int, like: Tensor) -> int:
    """Rows to pad n rows to: the decoder's row grid on CUDA (shapes repeat), n elsewhere."""
    from .decoder import token_rows

    return token_rows(n) if like.is_cuda else n


def row_bits(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Bits summed per example [B] from logits [1, M, E, V] of B*T rows padded to M (rows
    B*T.. are padding) and targets, mask [B, T, E] (packed rows: B = their count, T = 1)."""
    n, E = targets.shape[0] * targets.shape[1], targets.shape[2]
    tg = nn.functional.pad(targets.reshape(n, E), (0, 0, 0, logits.shape[1] - n))
    nll = nn.functional.cross_entropy(logits.float().flatten(0, -2), tg.flatten(),
                                      reduction="none")[:n * E].view(targets.shape)
    return (nll * mask).flatten(1).sum(1) / LN2


SupportFactory = Callable[[object, int], ModeSupport]


class Registry:
    """Mode name -> factory ``(mode_config, d_model) -> ModeSupport``. Register to add a mode."""

    def __init__(self) -> None:
        self._factories: dict[str, SupportFactory] = {}

    def register(self, name: str, factory: SupportFactory) -> None:
        """Add a mode; its config goes in ``ModelConfig.modes[name]``."""
        if name in self._factories:
            raise ValueError(f"mode {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        """Registered mode names, in registration order."""
        return list(self._factories)

    def build(self, name: str, cfg: object, d_model: int) -> ModeSupport:
        """Construct the support of a registered mode."""
        if name not in self._factories:
            raise KeyError(f"mode {name!r} is not registered (known: {self.names()})")
        return self._factories[name](cfg, d_model)


def default_registry() -> Registry:
    """A fresh registry holding the built-in modes: text, image, audio."""
    from .audio import AudioSupport
    from .image import ImageSupport
    from .text import TextSupport

    reg = Registry()
    reg.register("text", TextSupport)
    reg.register("image", ImageSupport)
    reg.register("audio", AudioSupport)
    return reg
