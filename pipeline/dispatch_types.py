"""Records of the dispatcher: its config, requests, batches, results, finished examples, errors.

The runner protocol (what the model supplies, one callable per mode)::

    def runner(batch: Batch) -> Sequence[Result]:   # len(result) == len(batch.requests)

``batch.requests[i].context`` is the example's context state after its previous block (``None``
before its first block unless ``init_state`` was given), ``inputs``/``targets`` the prepared block
content (teacher forcing) or ``None`` for a block the runner must generate. ``Result.state``
becomes the example's new context; ``Result.next = (mode, shape)`` asks for one more block once the
example's own blocks are exhausted (generation); ``Result.block`` is a generated block's content.
A batch may be empty (``requests == []``) when several ranks run in step and this rank has nothing
of the agreed mode: the runner must still run (e.g. a zero loss that touches the mode's head) so
that gradient synchronisation sees the same steps on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Shape = tuple[int, ...]

# Why a batch ran: its bucket was full, its oldest request outlived the TTL, nothing was full
# and no more examples could be admitted (stall), the source is exhausted (drain), or this rank
# had nothing of the mode all ranks agreed on (empty).
REASONS = ("full", "ttl", "stall", "drain", "empty")

ADMISSIONS = ("inline", "one_by_one", "prefetch")  # DispatchConfig.admission


@dataclass
class DispatchConfig:
    """Settings of :class:`blocklm.pipeline.dispatch.Dispatcher`.

    ``budget`` is the token budget of a batch, on *padded* cost: a batch of ``n`` requests whose
    elementwise largest shape is ``S`` costs ``n * cost(mode, S)`` and never exceeds the budget.
    ``ttl_steps`` is the time-to-live on the logical clock (one tick per dispatcher step);
    ``ttl_seconds``, when set, replaces it with a wall-clock TTL (generation, serving; not
    deterministic).
    """

    max_in_flight: int = 1024  # K: examples admitted and not yet finished
    budget: int = 8192  # token budget of a batch (padded cost)
    mode_budget: dict[str, int] = field(default_factory=dict)  # per-mode override of budget
    max_batch_samples: int | None = None  # optional cap on requests per batch (every bucket)
    mode_max_samples: dict[str, int] = field(default_factory=dict)  # per-mode override of the cap
    ttl_steps: int = 256
    ttl_seconds: float | None = None
    prefetch: int = 256  # samples prepared ahead by the background thread; 0: no thread
    prefetch_chunk: int = 32  # samples handed over per queue operation
    decode_workers: int = 1  # threads decoding ahead (order kept); needs prefetch > 0
    decode: bool = True  # inputs = targets = block.decode() (else the block object itself)
    on_oversize: str = "reject"  # "reject": count it and finish the example with the error; "raise"
    keep_outputs: bool = False  # collect every Result.output in the example's Finished record
    max_blocks: int = 4096  # an example never grows past this many blocks (generation)
    # a batch its bucket does not fill (ttl, stall, drain) takes whole neighbouring buckets of
    # its mode along where one batch fewer is worth this many padded tokens (dispatch_coalesce.py)
    coalesce_tokens: int | None = None
    mode_coalesce_tokens: dict[str, int | None] = field(default_factory=dict)  # per-mode override
    # at a stall (no bucket full or expired), the partial bucket with the most pending padded
    # cost runs; a mode's cost counts times this weight there (default 1). Under 1 the mode's
    # partial buckets wait for fuller batches while others run (the TTL still bounds the wait):
    # for a mode whose batch costs per batch, not per token (image: 2,400 sequential stack steps
    # whatever the batch size)
    mode_stall_weight: dict[str, float] = field(default_factory=dict)
    # where each example and its first request are built (dispatch_admit.py; same batches):
    # "inline" in the run's thread as a chunk arrives, "one_by_one" the same thread the older,
    # slower way, "prefetch" in the prefetch thread (slower on the H200: its GIL competes)
    admission: str = "inline"

    def __post_init__(self) -> None:
        if self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        for name, b in [("budget", self.budget), *self.mode_budget.items()]:
            if b < 1:
                raise ValueError(f"budget of {name!r} must be >= 1, got {b}")
        if self.ttl_steps < 1:
            raise ValueError(f"ttl_steps must be >= 1, got {self.ttl_steps}")
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be > 0, got {self.ttl_seconds}")
        for name, lam in [("coalesce_tokens", self.coalesce_tokens),
                          *self.mode_coalesce_tokens.items()]:
            if lam is not None and lam < 0:
                raise ValueError(f"coalesce_tokens of {name!r} must be >= 0, got {lam}")
        for name, w in self.mode_stall_weight.items():
            if not (isinstance(w, (int, float)) and not isinstance(w, bool) and w > 0
                    and math.isfinite(w)):
                raise ValueError(f"mode_stall_weight of {name!r} must be a number > 0, got {w!r}")
        if self.on_oversize not in ("reject", "raise"):
            raise ValueError(f"on_oversize must be 'reject' or 'raise', got {self.on_oversize!r}")
        if self.admission not in ADMISSIONS:
            raise ValueError(f"admission must be one of {ADMISSIONS}, got {self.admission!r}")

    def budget_of(self, mode: str) -> int:
        return self.mode_budget.get(mode, self.budget)

    def coalesce_of(self, mode: str) -> int | None:
        return self.mode_coalesce_tokens.get(mode, self.coalesce_tokens)

    def stall_weight_of(self, mode: str) -> float:
        return float(self.mode_stall_weight.get(mode, 1.0))

    def cap_of(self, mode: str) -> int | None:
        return self.mode_max_samples.get(mode, self.max_batch_samples)


def training_config(**overrides: Any) -> DispatchConfig:
    """Preset for training: logical-clock TTL (deterministic, DDP-safe), decoding ahead."""
    return DispatchConfig(**overrides)


def generation_config(**overrides: Any) -> DispatchConfig:
    """Preset for generation/serving: wall-clock TTL of 50 ms so a lone request is not held."""
    kw: dict[str, Any] = dict(max_in_flight=256, ttl_seconds=0.05, keep_outputs=True)
    kw.update(overrides)
    return DispatchConfig(**kw)


@dataclass(slots=True, eq=False)
class Request:
    """One block of one example, waiting in its mode's queue (or handed to a runner).

    ``example`` is the example id (its position in the source); ``block`` the block index in
    the example (generated blocks continue the numbering); ``part`` the piece of a block that was
    split to fit the budget (0 otherwise); ``context`` the example's context state (handle) after
    its previous block; ``cost`` the block's cost in tokens; ``t`` its enqueue time on the
    dispatcher's clock; ``seq`` its global enqueue order.
    """

    example: int
    key: str
    block: int
    part: int
    mode: str
    shape: Shape
    context: Any
    inputs: Any
    targets: Any
    cost: int
    t: float
    seq: int
    _ex: Any = field(default=None, repr=False)  # the dispatcher's in-flight example record

    @property
    def last(self) -> bool:
        """Whether this is the last piece its example has so far: no later block reads the
        state after it (unless its runner asks for a next block, as generation does)."""
        ex = self._ex
        return ex is not None and ex.next + 1 >= len(ex.pieces)


@dataclass(slots=True)
class Result:
    """What a runner returns for one request (see the module docstring)."""

    state: Any = None  # the example's new context state
    output: Any = None  # loss terms, output embeddings... kept if config.keep_outputs
    next: tuple[str, Shape] | None = None  # generation: mode and shape of the next block
    block: Any = None  # generation: the sampled content of this block


@dataclass(slots=True)
class Batch:
    """Requests of one mode run together. ``padded_shape`` is the elementwise max of the shapes
    (``None`` for an empty batch); ``padded_cost = len(requests) * cost(mode, padded_shape)``;
    ``cost`` the sum of the requests' own costs."""

    step: int
    mode: str
    bucket: tuple[int, ...] | None
    requests: list[Request]
    padded_shape: Shape | None
    padded_cost: int
    cost: int
    reason: str

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def inputs(self) -> list[Any]:
        return [r.inputs for r in self.requests]

    @property
    def targets(self) -> list[Any]:
        return [r.targets for r in self.requests]

    @property
    def contexts(self) -> list[Any]:
        return [r.context for r in self.requests]


@dataclass(slots=True)
class Finished:
    """An example that left the dispatcher: done, or rejected with ``error``."""

    example: int
    key: str
    state: Any
    outputs: list[tuple[int, int, Any]]  # (block, part, Result.output) if config.keep_outputs
    generated: list[tuple[str, Shape, Any]]  # (mode, shape, Result.block) of generated blocks
    error: Exception | None = None


@dataclass(slots=True)
class Step:
    """What :meth:`Dispatcher.run` yields after each runner step."""

    index: int
    batch: Batch
    results: Sequence[Result]
    finished: list[Finished]


class DispatchError(ValueError):
    """A request the dispatcher cannot serve; names the sample key, block and what was wrong."""

    def __init__(self, message: str, *, key: str | None = None, block: int | None = None,
                 mode: str | None = None) -> None:
        self.key, self.block, self.mode, self.reason = key, block, mode, message
        where = [w for w in (f"sample {key!r}" if key is not None else None,
                             f"block {block}" if block is not None else None,
                             f"mode {mode!r}" if mode is not None else None) if w]
        super().__init__(f"{', '.join(where)}: {message}" if where else message)


class OversizeBlockError(DispatchError):
    """A block costs more than its mode's whole batch budget and its mode cannot split it."""


class UnknownModeError(DispatchError):
    """A block's mode has no runner."""


class PrepareError(DispatchError):
    """Preparing (decoding) a block failed."""


Runner = Callable[[Batch], Sequence[Result]]
