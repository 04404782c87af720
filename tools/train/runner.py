"""The model as the dispatcher's runners: one callable per mode, and the loss accumulator.

An example's context between blocks is its decoder state ([state_size] fp32), held by the
dispatcher inside a :class:`Context`. Gradients flow through contexts across blocks within one
accumulation window (truncated back-propagation through time at optimizer steps): a context made
in an earlier window is detached when it is read.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.profiler import record_function

from blocklm.model.batch import to_device
from blocklm.model.blocklm import BlockLM
from blocklm.model.heads import END
from blocklm.pipeline.dispatch_types import Batch, Result

from .state_groups import StateGroups
from .state_rows import unbind_rows

HEADS = ("next_mode", "shape")  # the head terms of the objective, in this order


@dataclass
class Context:
    """An example's state after its latest block, tagged with the window that made it."""

    state: Tensor | None  # [state_size] fp32; None after an example's last block
    window: int
    # where the state's tail (summary, history: all the end-of-example head reads) lies: row
    # `head[1]` of the batch's BlockResult.head_state; None: slice it from `state` (restored)
    head: tuple[Tensor, int] | None = None
    # read by its example's next block or its end head: no longer the example's context (a
    # step object may still hold it for a while; state_groups.py does not count it as live)
    spent: bool = False


@dataclass
class Window:
    """Loss terms accumulated since the last optimizer step (graph attached)."""

    index: int = 0
    tokens: int = 0  # decoder steps run
    # bytes of recurrent state its batches hold, [B, state_size] in and out
    # (train.window_max_state_gib)
    state_bytes: int = 0
    bits: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    elements: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    # the heads' bits per kind of prediction (HEADS: next mode incl. end, shape) and counts
    head_bits: dict[str, list[Tensor]] = field(default_factory=lambda: defaultdict(list))
    head_count: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    mode_correct: int = 0  # next-mode predictions that were right (argmax), when measured
    mode_total: int = 0
    # the same over the predictions made after an example's first block (the later blocks'
    # modes and the end): on block lists whose layout follows from their history (the mixed
    # pairs) these are determined, unlike the first block's mode
    later_correct: int = 0
    later_total: int = 0
    shape_correct: int = 0  # shapes whose most likely bins were all right, when measured
    shape_total: int = 0

    def objective(self, elements: dict[str, float] | None = None,
                  head_count: dict[str, float] | None = None) -> Tensor | None:
        """Sum over modes of bits per element, plus each head's mean bits per prediction.

        The next-mode head and the shape head are separate terms: averaged together, the shape
        bits (often 10+ per block) would drown the next-mode bits (about 1). ``elements`` /
        ``head_count`` override the normalisers with global counts (several ranks each
        back-propagate their share; the shares add up to the global objective)."""
        elements = self.elements if elements is None else elements
        head_count = self.head_count if head_count is None else head_count
        terms = [torch.stack([b.sum() for b in bs]).sum() / max(elements[m], 1.0)
                 for m, bs in self.bits.items() if bs]
        terms += [torch.cat(bs).sum() / max(head_count[k], 1.0)
                  for k, bs in self.head_bits.items() if bs]
        return torch.stack(terms).sum() if terms else None

    def sums(self, modes: list[str]) -> list[float]:
        """[bits, elements] per mode in ``modes`` order, then [bits, count] per head in HEADS."""
        return [v for pair in zip(self.bit_sums(modes), self.counts(modes)) for v in pair]

    def counts(self, modes: list[str]) -> list[float]:
        """Elements per mode in ``modes`` order, then predictions per head in HEADS (host
        numbers: no GPU read)."""
        return [float(self.elements[m]) for m in modes] + \
               [float(self.head_count[k]) for k in HEADS]

    def bit_sums(self, modes: list[str]) -> list[float]:
        """Bits per mode in ``modes`` order, then per head in HEADS (detached)."""
        # one device -> host read for all sums (a float() per tensor waited for the GPU each)
        t = self.bit_sums_tensor(modes)
        return t.tolist() if t is not None else [0.0] * (len(modes) + len(HEADS))

    def bit_sums_tensor(self, modes: list[str]) -> Tensor | None:
        """:meth:`bit_sums` as one float64 tensor where the bits are (None without any): its
        ops are queued, nothing waits for the device (the trainer reads it a step later)."""
        groups = [self.bits.get(m) or [] for m in modes] + \
                 [self.head_bits.get(k) or [] for k in HEADS]
        parts = [torch.cat([b.detach().reshape(-1) for b in g]).sum() if g else None
                 for g in groups]
        first = next((p for p in parts if p is not None), None)
        if first is None:
            return None
        zero = first.new_zeros(())
        return torch.stack([zero if p is None else p for p in parts]).double()

    def heads_report(self) -> float | None:
        """Mean bits per head prediction (next mode and shape together), detached."""
        n = sum(self.head_count.values())
        if not n:
            return None
        return sum(float(torch.cat(bs).sum()) for bs in self.head_bits.values() if bs) / n

    def report(self) -> dict[str, float]:
        """Per-mode bits per element of this window (detached floats)."""
        return {m: float(torch.stack([b.sum() for b in bs]).sum().detach()) /
                max(self.elements[m], 1.0) for m, bs in sorted(self.bits.items()) if bs}


class ModelRunners:
    """Builds the per-mode runners over one :class:`BlockLM` and accumulates their losses."""

    def __init__(self, model: BlockLM, device: torch.device, *, train: bool = True,
                 autocast: bool = False, measure: bool = False,
                 cost_from_content: bool = False) -> None:
        self.model, self.device, self.train, self.autocast = model, device, train, autocast
        self.measure = measure  # also count next-mode and shape accuracy (evaluation)
        self.cost_from_content = cost_from_content  # prepare: also the content's cost shape
        self.window = Window()
        self.groups = StateGroups()  # the in-flight states, per batch that made them
        self._ac: torch.autocast | None = None  # open from a window's first batch to its end
        if device.type == "cuda":  # compile the fused layers' and heads' graphs now, not
            model.decoder.warm_layers(device, autocast=autocast)  # mid-window
            for sup in model.supports.values():
                sup.warm_head(device, autocast=autocast, grad=train)

    def _autocast(self) -> None:
        """Enter bf16 autocast for the rest of the window. Autocast caches each weight's bf16
        copy until its context closes: one context per window casts every weight once per
        optimizer step (one cast and one ToCopyBackward node), where a context per batch
        cast them again for every batch."""
        if self.autocast and self._ac is None:
            self._ac = torch.autocast(self.device.type, dtype=torch.bfloat16)
            self._ac.__enter__()

    def close_autocast(self) -> None:
        """Leave the window's autocast (before backward and the optimizer step: the cached
        copies must not outlive the weights they were cast from)."""
        if self._ac is not None:
            ac, self._ac = self._ac, None
            ac.__exit__(None, None, None)

    def prepare(self, block) -> tuple[object, object]:
        """The dispatcher's ``prepare`` (run in its read-ahead thread): the block decoded and
        passed through its mode support's :meth:`~blocklm.model.support.ModeSupport.prepare`
        (text: tokenized there instead of in the batch's set-up on the model's thread, where
        the H200 waited for it: GPU_NOTES.md, call P16; audio: its mu-law levels, P121). A
        mode without a support stays decoded (the dispatcher rejects its blocks). With
        ``cost_from_content`` (``train.cost_from_content``) also the support's
        :meth:`~blocklm.model.support.ModeSupport.cost_shape`: the dispatcher then charges and
        buckets a text by its exact tokens, not by its characters' estimate."""
        content = block.decode()
        if block.mode not in self.model.supports:
            return content, content
        sup = self.model.supports[block.mode]
        content = sup.prepare(content)
        if self.cost_from_content:
            return content, content, sup.cost_shape(content)
        return content, content

    def runner(self, mode: str):
        """The runner of ``mode`` for :class:`blocklm.pipeline.Dispatcher`."""
        return lambda batch: self.run(mode, batch)

    def _states(self, contexts: list[Context | None]) -> Tensor | None:
        """The batch's incoming states [B, state_size]; None when every block is its example's
        first (every text batch): ``run_block`` then starts from empty memories without making
        B empty rows (a stack of them was a [B, state_size] copy per batch)."""
        if all(c is None for c in contexts):
            return None
        init = None
        rows = []
        for c in contexts:
            if c is None:
                if init is None:
                    init = self.model.initial_state(1, self.device)[0]
                rows.append(init)
                continue
            c.spent = True  # the example moves on: no longer its context
            if c.window == self.window.index:
                rows.append(c.state)
            else:
                rows.append(c.state.detach())
        return torch.stack(rows)  # [B, state_size]

    def run(self, mode: str, batch: Batch) -> list[Result]:
        if not batch.requests:
            return []
        with record_function("blocklm:states"):
            state = self._states([r.context for r in batch.requests])
        contents = [r.inputs for r in batch.requests]
        self._autocast()
        res = self.model.run_block(mode, contents, state, targets=True, logits=False,
                                   state_out=self._keeps_state(batch))
        w = self.window
        loss = res.loss
        w.tokens += batch.padded_cost
        for t in (state, res.state):  # alive with the window's graph until its backward
            if t is not None:
                w.state_bytes += t.numel() * t.element_size()
        w.bits[mode].append(loss.bits.float())
        w.elements[mode] += (loss.element_count if loss.element_count is not None
                             else float(loss.elements.sum()))
        w.head_bits["next_mode"].append(loss.mode_bits.float())
        w.head_bits["shape"].append(loss.shape_bits.float())
        w.head_count["next_mode"] += len(batch.requests)
        w.head_count["shape"] += len(batch.requests)
        if self.measure:
            full = state if state is not None else self.model.initial_state(len(contents),
                                                                            self.device)
            # the blocks' own shapes (a request's may be its cost shape: cost_from_content)
            sup = self.model.supports[mode]
            shapes = [sup.shape_of(r.targets) if self.cost_from_content else r.shape
                      for r in batch.requests]
            self._accuracy(self.model.head_input(full), mode, shapes,
                           [r.block > 0 for r in batch.requests])
        heads = res.head_state if self.train else res.head_state.detach()
        if res.state is None:  # the examples' last blocks: only the end head reads on
            return [Result(state=Context(None, w.index, (heads, i))) for i in range(len(contents))]
        new = res.state if self.train else res.state.detach()
        # one unbind, not new[i] per example: B select nodes each filled a zero [B, state]
        # gradient in backward (O(B^2) work, half of the GPU time of a text step); and not
        # torch's unbind, whose backward fills each row without a gradient by its own launch
        made = [Context(row, w.index, (heads, i)) for i, row in enumerate(unbind_rows(new))]
        self.groups.add(made, len(made))  # compacted at the window's close (state_groups.py)
        return [Result(state=c) for c in made]

    @staticmethod
    def _keeps_state(batch: Batch) -> bool:
        """Whether a later block reads a state this batch makes: not when every request is its
        example's last piece (every text batch of one-block examples). Its packed state was a
        [B, state_size] concatenation forward that only the end head read (now its tail)."""
        return not all(getattr(r, "last", False) for r in batch.requests)

    def _head_states(self, contexts: list[Context]) -> Tensor:
        """The finished examples' state tails [B, d_model + 2M] (summary, history), gathered
        per batch that made them (one index_select each, whole batches as they are), not
        whole states: stacking [B, state_size] rows for the end-of-example head copied ~1.2M
        floats per example forward and filled as many zero gradients in backward (6.9 + ~6 ms
        of a text step's GPU time on the H200, GPU_NOTES thru-B); the order of the rows is
        not kept (their bits are summed)."""
        groups: dict[tuple[int, bool], tuple[Tensor, list[int]]] = {}
        parts = []
        k = self.model.state_size - self.model.decoder.layout.offsets["summary"][0]
        for c in contexts:
            old = c.window != self.window.index
            if c.head is None:  # restored from a checkpoint: its row is all there is
                parts.append(c.state[None, -k:].detach() if old else c.state[None, -k:])
                continue
            src, i = c.head
            groups.setdefault((id(src), old), (src, []))[1].append(i)
        for (_, old), (src, idx) in groups.items():
            src = src.detach() if old else src
            if idx != list(range(src.shape[0])):
                src = src.index_select(0, to_device(torch.tensor(idx), src.device))
            parts.append(src)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def finish(self, contexts: list[Context]) -> None:
        """Add the bits of predicting end-of-example after each finished example's last block."""
        if not contexts:
            return
        for c in contexts:
            c.spent = True
        self._autocast()
        ctx = self.model.head_input_of(self._head_states(contexts))
        bits = self.model.heads.mode_bits(ctx, [END] * len(contexts))
        self.window.head_bits["next_mode"].append(bits.float())
        self.window.head_count["next_mode"] += len(contexts)
        if self.measure:
            self._accuracy(ctx, END, [], [True] * len(contexts))

    @torch.no_grad()
    def _accuracy(self, summary: Tensor, mode: str, shapes: list[tuple[int, ...]],
                  later: list[bool]) -> None:
        """Count argmax next-mode hits (all, and those after a first block: ``later``) and,
        for blocks, exact shape-bin hits (greedy). ``summary``: the heads' input [B, ...]."""
        heads, w = self.model.heads, self.window
        pred = heads.mode_logits(summary).argmax(-1)
        hit = pred == heads.names.index(mode)
        later_t = torch.tensor(later, dtype=torch.bool, device=hit.device)
        w.mode_correct += int(hit.sum())
        w.mode_total += summary.shape[0]
        w.later_correct += int((hit & later_t).sum())
        w.later_total += int(later_t.sum())
        if mode == END:
            return
        head = heads.shape[mode]
        _, classes = head.predict(heads.trunk(summary), None, None)
        true = head.classes(torch.tensor(shapes, device=summary.device))
        w.shape_correct += int((classes == true).all(1).sum())
        w.shape_total += len(shapes)

    def next_window(self) -> Window:
        """Close the current window (after its optimizer step) and open the next one."""
        self.close_autocast()
        done = self.window
        self.window = Window(index=done.index + 1)
        self.groups.close()  # the states still in flight: detached, their storage compacted
        return done
