"""Cost model of the dispatcher: how many decoder steps (tokens) a block of a given shape costs.

A cost function is any callable ``cost(mode, shape) -> int``. The model issue's mode supports
will provide one (``steps(shape)`` per mode); until then :class:`DefaultCost` applies a simple
per-mode rule:

- ``text``, shape ``(L,)``: ``L`` tokens (one per unit of length);
- ``image``, shape ``(H, W[, C])``: ``ceil(H/16) * ceil(W/16)`` patch tokens (channels go into the
  patch);
- ``audio``, shape ``(frames[, channels])``: ``ceil(frames/160)`` tokens (20 ms hops at 8 kHz;
  channels go into the token);
- any other mode: the number of elements of the shape.

Every block costs at least 1 (the block's start token). Padding is measured in the same unit: a
batch padded to shape ``S`` costs ``cost(mode, S)`` per request.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

Shape = tuple[int, ...]
CostFn = Callable[[str, Shape], int]


@dataclass(frozen=True)
class DefaultCost:
    """The per-mode rule of the module docstring; patch and hop sizes are configurable."""

    image_patch: int = 16
    audio_hop: int = 160
    text_unit: int = 1

    def __call__(self, mode: str, shape: Shape) -> int:
        if not shape:
            return 1
        if mode == "text":
            return max(1, -(-shape[0] // self.text_unit))
        if mode == "image" and len(shape) >= 2:
            p = self.image_patch
            return max(1, (-(-shape[0] // p)) * (-(-shape[1] // p)))
        if mode == "audio":
            return max(1, -(-shape[0] // self.audio_hop))
        return max(1, math.prod(shape))


default_cost: CostFn = DefaultCost()


def cost_from_supports(supports: Mapping[str, object], fallback: CostFn = default_cost) -> CostFn:
    """A cost function from mode supports that have ``steps(shape) -> int`` (the model issue);
    modes without a support (or without ``steps``) fall back to ``fallback``."""

    def cost(mode: str, shape: Shape) -> int:
        s = supports.get(mode)
        steps = getattr(s, "steps", None)
        return max(1, int(steps(shape))) if steps is not None else fallback(mode, shape)

    return cost


@dataclass
class ModeCost:
    """The cost of one mode's shapes, memoised: shapes repeat, and the dispatcher asks per request.

    The memo is capped (``max_entries``) so adversarial data with ever-new shapes cannot grow it
    without bound; past the cap the cost function is simply called.
    """

    mode: str
    fn: CostFn
    max_entries: int = 1 << 16
    memo: dict[Shape, int] = field(default_factory=dict)

    def __call__(self, shape: Shape) -> int:
        c = self.memo.get(shape)
        if c is None:
            c = int(self.fn(self.mode, shape))
            if c < 0:
                raise ValueError(f"cost of mode {self.mode!r} shape {shape} is negative: {c}")
            if len(self.memo) < self.max_entries:
                self.memo[shape] = c
        return c
