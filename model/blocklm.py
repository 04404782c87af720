"""BlockLM: mode supports + shared recurrent decoder + next-mode/shape heads.

The entry points the dispatcher and the trainer call; see the package docstring for the
protocol (one call per batch of same-mode blocks, states stacked along dim 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.profiler import record_function

from .config import ModelConfig, SampleConfig
from .decoder import Decoder
from .heads import END, Heads
from .support import ModeSupport, Registry, default_registry


@dataclass
class BlockLoss:
    """Per-example loss terms of one block, in bits (sum them, divide by the counts)."""

    bits: Tensor  # [B] content bits summed over the block
    elements: Tensor  # [B] elements they are reported per (characters, sub-pixels, samples)
    mode_bits: Tensor  # [B] bits of this block's mode, predicted from the incoming state
    shape_bits: Tensor  # [B] bits of this block's shape given its mode, from the incoming state
    # elements.sum() counted on the host from the shapes: reading it from the device tensor
    # made the trainer wait for the GPU once per batch
    element_count: float | None = None

    @property
    def bits_per_element(self) -> Tensor:
        """[B] content bits per element (0 for empty blocks)."""
        return self.bits / self.elements.clamp(min=1)


@dataclass
class BlockResult:
    """What :meth:`BlockLM.run_block` returns."""

    loss: BlockLoss | None  # None when run with targets=False
    state: Tensor | None  # [B, state_size] fp32: the context after the block (None when run
    # with state=False)
    outputs: Tensor  # [B,T,d_model] decoder outputs
    mode_logits: Tensor | None  # [B, modes+1] next-mode logits from the new state (last =
    # end); None when run with logits=False (the trainer: they are not part of its loss)
    # [B, d_model + 2M]: the state's tail (summary, history), all the heads read of it, made
    # from the decoder's parts: a reader of state[:, -k:] took a zero gradient of whole rows
    head_state: Tensor | None = None


COUNT_BINS = 4  # the heads see 0, 1, 2 and "3 or more" blocks of each mode


class BlockLM(nn.Module):
    """The block-list model. ``cfg.modes`` names the modes; ``registry`` builds their supports."""

    def __init__(self, cfg: ModelConfig, registry: Registry | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        registry = registry or default_registry()
        d = cfg.decoder.d_model
        self.supports = nn.ModuleDict({m: registry.build(m, c, d) for m, c in cfg.modes.items()})
        self.decoder = Decoder(cfg.decoder)
        # The heads read the decoder's block summary plus the example's block history: how many
        # blocks of each mode came so far and which mode came last. The history is exact
        # bookkeeping kept in the state (2M floats), so "what comes next" can depend on where the
        # example stands (e.g. a caption after an image, then the end) without the decoder
        # having to learn to count blocks in its memories.
        self.heads = Heads(cfg.heads, d + (COUNT_BINS + 1) * len(self.supports),
                           {m: s.shape_spec() for m, s in self.supports.items()})

    @property
    def modes(self) -> list[str]:
        """Registered mode names, then ``"end"`` (the classes of the next-mode head)."""
        return self.heads.names

    @property
    def state_size(self) -> int:
        """Length of one example's state vector: the decoder's state, then the block history
        (per-mode block counts [M], one-hot of the last block's mode [M])."""
        return self.decoder.layout.size + 2 * len(self.supports)

    def _split(self, state: Tensor) -> tuple[Tensor, Tensor]:
        """state [B,S] -> decoder state [B,S-2M], history [B,2M]."""
        n = self.decoder.layout.size
        return state[:, :n], state[:, n:]

    def _history_after(self, history: Tensor, mode: str) -> Tensor:
        """history [B,2M] after one more block of ``mode``: its count + 1, last = mode."""
        M = len(self.supports)
        onehot = torch.zeros(history.shape[0], M, device=history.device, dtype=history.dtype)
        onehot[:, list(self.supports).index(mode)] = 1.0
        return torch.cat([history[:, :M] + onehot, onehot], 1)

    def head_input(self, state: Tensor) -> Tensor:
        """What the next-mode and shape heads read: [rms-normalised summary, one-hot count bins
        per mode (0, 1, ..., COUNT_BINS - 1 or more), one-hot last mode] [B, d + (K+1)M], the
        one-hots scaled by sqrt(d). One-hot bins make "one passage so far" and "two passages so
        far" linearly separable; the summary is normalised so that its scale cannot drown the
        history features.

        Why sqrt(d): under Adam every weight moves by about lr per step whatever its gradient's
        size, so how fast a feature can pull the logits grows with its magnitude. The summary
        brings d unit-RMS features, the history only a few ones: at magnitude 1 the summary's
        weights outran the history's, the heads fitted content cues (which passage is the
        second one) and never used the counts that decide the next mode (a toy run got 8 of 120
        held-out determined predictions wrong, 0 with the scaling; see
        tests/tools/train/test_heads_learn.py). Scaled, each history feature is as large as the
        whole summary vector."""
        st = self.decoder.layout.unpack(state)
        return self._head_input(st["summary"], st["rest"])

    def _head_input(self, summary: Tensor, hist: Tensor) -> Tensor:
        """:meth:`head_input` from the state's parts (summary [B,d], history [B,2M])."""
        M = len(self.supports)
        summary = nn.functional.rms_norm(summary, (summary.shape[-1],), eps=1e-6)
        counts = hist[:, :M].round().clamp(0, COUNT_BINS - 1).long()  # [B,M]
        bins = nn.functional.one_hot(counts, COUNT_BINS).to(summary.dtype).flatten(1)  # [B,KM]
        scale = summary.shape[-1] ** 0.5
        return torch.cat([summary, bins * scale, hist[:, M:].to(summary.dtype) * scale], 1)

    def support(self, mode: str) -> ModeSupport:
        """The support of ``mode``."""
        if mode not in self.supports:
            raise KeyError(f"unknown mode {mode!r} (known: {list(self.supports)})")
        return self.supports[mode]

    def initial_state(self, batch: int, device=None) -> Tensor:
        """The state before an example's first block: [batch, state_size] fp32."""
        return torch.zeros(batch, self.state_size, device=device)

    def steps(self, mode: str, shape: tuple[int, ...]) -> int:
        """Decoder steps a block of this shape costs (the dispatcher's cost model; for text an
        estimate from the character count, see :meth:`content_steps`)."""
        return self.support(mode).steps(tuple(shape))

    def content_steps(self, mode: str, content) -> int:
        """Exact decoder steps of a decoded block (text: its token count + 1)."""
        return self.support(mode).content_steps(content)

    def summary(self, state: Tensor) -> Tensor:
        """The summary vector [B,d_model] inside a state."""
        return self.decoder.layout.unpack(self._split(state)[0])["summary"]

    def run_block(self, mode: str, contents: list, state: Tensor | None = None,
                  targets: bool = True, logits: bool = True,
                  state_out: bool = True) -> BlockResult:
        """Run a batch of blocks of one mode, each continuing its own example's state.

        contents: decoded contents (text ``str``, image uint8 [H,W,C], audio [frames,ch]);
        state: [B, state_size] (None: start of examples). With ``targets`` the result carries
        per-example losses: content bits and element counts, and the bits of predicting this
        block's mode and shape from the incoming state. ``state_out=False``: the new state is
        not packed (no later block reads it; ``head_state`` still holds its tail).
        """
        sup = self.support(mode)
        device = self.start_device()
        with record_function("blocklm:target"):
            batch = sup.target(contents, device)
        # one split of the whole row feeds the decoder, the heads and the history: in backward
        # its gradient is one concatenation; a slice per consumer filled a zero gradient of the
        # whole state each (~1.2M floats per example in `small`) and added them up
        st = self._fresh(len(contents), device) if state is None else \
            self.decoder.layout.unpack(state)
        history = st["rest"]
        tail = self._history_after(history, mode)
        with record_function("blocklm:decoder"):
            x = sup.embed(batch)  # [B,T,d]
            # the real steps' rows (model/rows.py), for the layers and the content head alike
            rows = self.decoder.packed_layout(batch.lengths, x, batch.steps)
            h, new_state, summary = self.decoder(x, st, batch.steps, tail=tail, summary=True,
                                                 pack=state_out or logits,
                                                 lengths=rows)  # [B,T,d]
        loss = None
        if targets:
            with record_function("blocklm:content_bits"):
                bits, elements = sup.bits(h, batch, rows)
            with record_function("blocklm:head_bits"):
                ctx = self._head_input(st["summary"], history)
                loss = BlockLoss(bits, elements,
                                 self.heads.mode_bits(ctx, [mode] * len(contents)),
                                 self.heads.shape_bits(ctx, mode, batch.shapes),
                                 float(sum(sup.elements_of(s) for s in batch.shapes)))
        out = None
        if logits:
            with record_function("blocklm:next_mode_logits"):
                out = self.heads.mode_logits(self.head_input(new_state))
        return BlockResult(loss, new_state, h, out,
                           torch.cat([summary, tail.to(summary.dtype)], 1))

    def _fresh(self, B: int, device) -> dict[str, Tensor | None]:
        """:meth:`initial_state`'s parts for the decoder, with the layers' memories None: the
        kernels then neither read an empty incoming memory nor write its gradient, and no
        [B, state_size] zero fill is made (~1.2M floats per example in `small`)."""
        mem = {f"{n}{i}" for i in range(len(self.decoder.layers)) for n in ("S", "z")}
        st = {n: None if n in mem else torch.zeros(B, *shp, device=device)
              for n, shp in self.decoder.layout.shapes.items()}
        st["rest"] = torch.zeros(B, 2 * len(self.supports), device=device)
        return st

    def end_bits(self, state: Tensor) -> Tensor:
        """Bits of predicting end-of-example from the state after the last block: [B]."""
        return self.heads.mode_bits(self.head_input(state), [END] * state.shape[0])

    def head_input_of(self, head_state: Tensor) -> Tensor:
        """:meth:`head_input` from a state's tail [B, d_model + 2M] (summary, history; see
        :attr:`BlockResult.head_state`): the same features without the whole state."""
        d = self.cfg.decoder.d_model
        return self._head_input(head_state[:, :d], head_state[:, d:])

    @torch.no_grad()
    def predict_next(self, state: Tensor, sampling: SampleConfig | None = None,
                     generator: torch.Generator | None = None) -> list[tuple[str, tuple | None]]:
        """Next (mode, shape) per example; ("end", None) ends it. sampling None: most likely."""
        from .sampling import sample_logits

        summary = self.head_input(state)
        logits = self.heads.mode_logits(summary)
        idx = logits.argmax(-1) if sampling is None else sample_logits(logits, sampling, generator)
        out: list[tuple[str, tuple | None]] = []
        for i, k in enumerate(idx.tolist()):
            mode = self.modes[k]
            if mode == END:
                out.append((END, None))
                continue
            ctx = self.heads.trunk(summary[i:i + 1])
            shp, _ = self.heads.shape[mode].predict(ctx, sampling, generator)
            out.append((mode, tuple(int(v) for v in shp[0].tolist())))
        return out

    @torch.no_grad()
    def generate_block(self, mode: str, shapes: list[tuple[int, ...]], state: Tensor | None = None,
                       sampling: SampleConfig | None = None,
                       generator: torch.Generator | None = None) -> tuple[list, Tensor]:
        """Sample one block of ``mode`` per example with the requested shapes.

        Returns the contents (text ``str``, image uint8 [H,W,C], audio int16 [frames,ch]) and
        the state after the block (as if the sampled block had been run).
        """
        sup, sampling = self.support(mode), sampling or SampleConfig()
        shapes = [tuple(int(d) for d in s) for s in shapes]
        device = self.start_device()
        B = len(shapes)
        state = self.initial_state(B, device) if state is None else state
        state, history = self._split(state)  # the decoder steps on its own part
        elems: list[list[Tensor]] = [[] for _ in range(B)]
        done = [sup.complete(torch.zeros(0, sup.elements_per_step, dtype=torch.long), s)
                for s in shapes]
        final = [False] * B  # the summary step (consuming the last elements) has run
        prev: Tensor | None = None
        t = 0
        while not all(final):
            active = torch.tensor([not f for f in final], device=device)
            step = sup.step_inputs(prev, shapes, t, device)
            h, state = self.decoder.step(sup.embed(step)[:, 0], state, active)  # [B,d]
            final = [f or d for f, d in zip(final, done)]
            if not all(done):
                v = sup.sample(h, shapes, t, sampling, generator)  # [B,E]
                for i in range(B):
                    if not done[i]:
                        elems[i].append(v[i].cpu())
                        done[i] = sup.complete(torch.stack(elems[i]), shapes[i])
                prev = v
            t += 1
        E = sup.elements_per_step
        contents = [sup.assemble(torch.stack(e) if e else torch.zeros(0, E, dtype=torch.long), s)
                    for e, s in zip(elems, shapes)]
        return contents, torch.cat([state, self._history_after(history, mode)], 1)

    def start_device(self) -> torch.device:
        """The device of the model's parameters."""
        return next(self.parameters()).device
