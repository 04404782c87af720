"""Helpers of the training loop (:mod:`.loop`): checkpointable dispatcher state, the stop flag,
metrics records, the window's batch limit and the garbage collector's settings."""

from __future__ import annotations

import gc
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from .runner import Context


def _pack_contexts(state: dict[str, Any]) -> dict[str, Any]:
    """Dispatcher state with :class:`Context` objects as plain dicts (for ``weights_only``)."""
    out = dict(state)
    out["in_flight"] = [dict(e, state=None if e["state"] is None else
                             {"state": e["state"].state.detach(), "window": e["state"].window})
                        for e in state["in_flight"]]
    return out


def _unpack_contexts(state: dict[str, Any]) -> dict[str, Any]:
    out = dict(state)
    out["in_flight"] = [dict(e, state=None if e["state"] is None else
                             Context(e["state"]["state"], e["state"]["window"]))
                        for e in state["in_flight"]]
    return out


class StopFlag:
    """Set by SIGINT/SIGTERM: the loop finishes its window, checkpoints and exits."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._set)
            except ValueError:  # not the main thread: no handlers, the caller stops us
                pass
        return self

    def _set(self, signum, frame) -> None:
        if self.signal is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _loader_stats(source: Any) -> dict[str, Any] | None:
    stats = getattr(source, "stats", None)
    return stats.to_dict() if stats is not None else None


def _dispatch_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The dispatcher's metrics worth a line in every record."""
    keep = ("padding_ratio", "batch_fill", "tokens_per_batch_mean", "queue_age_p99",
            "ttl_forced", "batches")
    return {"examples_in_flight": m.get("examples_in_flight"), "rejected": m.get("rejected"),
            "modes": {k: {f: v.get(f) for f in keep if f in v}
                      for k, v in m.get("modes", {}).items()}}


def window_limited(run: Iterator[Any], disp: Any, room: int | None,
                   used: Callable[[], int],
                   mode_rooms: Mapping[str, int] | None = None) -> Iterator[Any]:
    """``run``'s steps (a dispatcher run of ``disp``), each next batch limited to the padded
    tokens left of ``room`` in the optimizer step's window (``used()``: those run in it so far;
    ``room`` None: no limit), or of ``mode_rooms[mode]`` for a batch of that mode. The limit is
    set when the consumer asks for the next step, after any optimizer step it took, and before
    the dispatcher forms that batch; it depends only on the batches, so a resumed run (whose
    checkpoint sits at a window boundary) sets the same."""
    rooms = dict(mode_rooms or {})
    while True:
        u = used()
        disp.batch_limit = None if room is None else max(1, room - u)
        disp.mode_batch_limit = {m: max(1, r - u) for m, r in rooms.items()}
        st = next(run, None)
        if st is None:
            return
        yield st


def window_rooms(t: Any) -> tuple[int | None, dict[str, int]]:
    """A :class:`~.config.TrainConfig`'s window rooms in padded tokens: every batch's
    (``window_max`` x ``tokens_per_step``; None: no cap) and the modes' own
    (``window_mode_max``)."""
    room = None if t.window_max is None else int(t.window_max * t.tokens_per_step)
    return room, {m: int(f * t.tokens_per_step) for m, f in t.window_mode_max.items()}


class HostThreads:
    """PyTorch's intra-op CPU threads set to ``n`` for a fit (a context manager; ``None``:
    unchanged), and the previous number restored at its end. Set before the fit starts its
    helper threads, so their first parallel op takes the same number."""

    def __init__(self, n: int | None) -> None:
        self.n = n  # (build_config checks train.host_threads)
        self._before: int | None = None

    def __enter__(self) -> HostThreads:
        if self.n is not None:
            self._before = torch.get_num_threads()
            torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._before is not None:
            torch.set_num_threads(self._before)
            self._before = None


def host_threads(n: int | None, device_type: str) -> int | None:
    """``train.host_threads`` resolved: None -> 1 on CUDA, else None (torch's default)."""
    return n if n is not None else (1 if device_type == "cuda" else None)


FULL_GC_EVERY = 500  # generation-1 collections between full ones (train.full_gc_every; Python: 10)


class GCFreeze:
    """The garbage collector while a trainer fits (a context manager; the thresholds are
    restored at the end, and the freeze undone unless objects were frozen before it began:
    those stay frozen, and the trainer's with them).

    The objects that exist when training starts (the model, the optimizer, every imported
    module: ~0.44M in a CPU trainer) are frozen out of the collector (``gc.freeze``): a full
    collection traversed them all (146-238 ms, `python -m blocklm.tools.bench_turnover`; 6-75 ms
    frozen), one about every epoch of the small text set, and one falling at a turnover made it
    230-350 ms instead of ~50 (237-306 ms turnovers on the H200, 51-77 ms without one). Full
    collections are also made rarer (``full_every``; at first 5x Python's default): a pass over
    the young objects of two epochs still costs 20-75 ms, and the admission of an epoch's examples triggered one at
    most turnovers (mixed: 36-86 ms turnovers, 17-26 without); young cyclic garbage is collected
    as often as before.

    ``full_every`` (``train.full_gc_every``, default 500; 50 until 2026-11-24): on the H200 a
    mixed run's full collections still traversed 184-280k live objects (the examples read ahead
    and in flight: their samples, blocks, token ids, requests) at 119-291 ms each, one every
    14-40 optimizer steps (P41; in 40-step windows one of 186-297 ms, 1.1-1.8% of the window:
    GPU_NOTES P42-P43). Ten times rarer, the cyclic garbage they free (9-50k small objects each
    there) waits ten times longer.

    Until 2026-11-24 it froze nothing where objects were already frozen, which is every run on
    the H200 (375 frozen at import): there every full collection traversed the model and all
    modules, 255-283 ms about every 20 text steps (call GC, ``bench train``'s ``full_gc_ms``).
    Freezing the survivors of every optimizer step as well is not done: frozen cyclic garbage
    would hold its tensors until the end."""

    def __init__(self, full_every: int = FULL_GC_EVERY) -> None:
        if not (isinstance(full_every, int) and not isinstance(full_every, bool)
                and full_every >= 1):
            raise ValueError(f"full collections every N generation-1 collections: N must be a "
                             f"whole number >= 1, got {full_every!r} (train.full_gc_every)")
        self.full_every = full_every
        self.active = False  # whether the freeze is ours to undo at the end
        self._threshold: tuple[int, int, int] | None = None

    def __enter__(self) -> GCFreeze:
        # Frozen objects from before (the H200's imports leave 375: call GC) are no reason
        # not to freeze; they only mean the end must not unfreeze them (and ours with them)
        self.active = gc.get_freeze_count() == 0
        gc.collect()  # garbage is freed, not frozen
        gc.freeze()
        self._threshold = gc.get_threshold()
        t = self._threshold
        gc.set_threshold(t[0], t[1], max(t[2], self.full_every))
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._threshold is not None:
            gc.set_threshold(*self._threshold)
        if self.active:
            gc.unfreeze()
            self.active = False


def stop_reason(coll: Any, done: bool, deadline: float, stop: StopFlag) -> str | None:
    """Why training stops now, agreed by every rank: "signal", "steps" (``done``), "minutes"
    (past ``deadline`` on the monotonic clock), or None to go on."""
    flags = coll.sum([float(done), float(time.monotonic() >= deadline),
                      float(stop.signal is not None)])
    if flags[2]:
        return "signal"
    if flags[0]:
        return "steps"
    return "minutes" if flags[1] else None


def window_full(window: Any, t: Any, coll: Any) -> bool:
    """Whether the optimizer step's window closes now, agreed by every rank: its padded tokens
    (summed over the ranks) reached ``t.tokens_per_step``, or any rank's batches hold
    ``t.window_max_state_gib`` of recurrent state (config.py: the token rooms do not count the
    states, which set the H200's peak memory on mixed data, GPU_NOTES P137). The close comes
    after the batch that crosses a limit: a window may hold one batch's states over the cap."""
    cap = t.window_max_state_gib
    over = cap is not None and window.state_bytes >= cap * 2**30
    tokens, n_over = coll.sum([float(window.tokens), float(over)])
    return tokens >= t.tokens_per_step or n_over > 0


def out_of_memory(e: torch.OutOfMemoryError, run: Any, step: int, window: Any, t: Any,
                  device: torch.device, world: int = 1) -> torch.OutOfMemoryError:
    """``e`` again, its message led by what the run was doing: the optimizer step, its window's
    padded tokens, batches' recurrent state and the caps on both, the device's memory, and
    the settings that lower it (a bare PyTorch message names none of them)."""
    mem = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        mem = (f"; on {device}: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB "
               f"allocated, {torch.cuda.memory_reserved(device) / 2**30:.1f} GiB reserved of "
               f"{total / 2**30:.1f} GiB")
    if not window.tokens and not window.state_bytes:  # an evaluation, checkpoint or log
        where = f"after optimizer step {step}, outside a window's batches{mem}"
    else:
        cap = t.window_max_state_gib
        share = f" (this rank's share of {world})" if world > 1 else ""
        where = (f"in optimizer step {step + 1}: its window held{share} {window.tokens:,} "
                 f"padded tokens (tokens_per_step {t.tokens_per_step:,}, train.window_max="
                 f"{t.window_max}) and {window.state_bytes / 2**30:.1f} GiB of recurrent state "
                 f"(train.window_max_state_gib={'none' if cap is None else cap}){mem}. A "
                 f"window's batches keep their activations and states until its backward: "
                 f"lower train.window_max_state_gib, train.window_max or "
                 f"train.chain_batch_samples")
    alloc = "none" if t.cuda_alloc is None else repr(t.cuda_alloc)
    return torch.OutOfMemoryError(
        f"{run}: out of memory {where}. The allocator's settings are train.cuda_alloc={alloc} "
        f"('max_split_size_mb:N' keeps blocks of N MiB and more whole where large blocks "
        f"fragment: model/GPU_NOTES.md, calls P137-P141); --resume continues from the last "
        f"checkpoint, if one was written (train.checkpoint_every={t.checkpoint_every}). "
        f"PyTorch said: {e}")
