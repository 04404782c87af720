"""``bench train``'s step timer: host time per optimizer step, split into model calls, the
optimizer step and the rest (the data wait); on CUDA also the GPU's own time in the host's data
work (between one model call's or optimizer step's work and the next one's), and the peak memory
of each step."""

from __future__ import annotations

import gc
import time
from collections import defaultdict

PEAK_TFLOPS = 989.0  # H200 SXM dense bf16


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wraps a trainer's runners and optimizer step with host timers (per optimizer step)."""

    def __init__(self, trainer, sync: bool = True, events=None) -> None:
        self.tr, self.sync = trainer, sync
        # the GPU's own clock, where there is one: an event after each model call and optimizer
        # step, and one before the next; the GPU time between them is the GPU idle (or running
        # the dispatcher's own state moves) while the host did the data work
        # (``gpu_data_gap_ms``), whether or not the host waited for the GPU at the step's end.
        # ``events``: a factory of objects with record() and elapsed_time(other) in ms
        # (torch.cuda.Event); None: CUDA's when it is there.
        self._events = events if events is not None else _cuda_events()
        self._gap_start = None  # the event after the last call's work, until the next call
        # (step it falls in, after the work, before the next; between windows or within one)
        self._gaps: list[tuple[int, object, object, bool]] = []
        self._gap_opt = False
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        # mode, requests, the model's padded grid, its blocks' exact steps, host ms of the model
        # call, the batch's cost by the dispatcher's cost model (which the sessions before
        # train.cost_from_content reported as real: for text ~9% under its tokens)
        self.batches: list[tuple[str, int, int, int, float]] = []
        self.hook = lambda n: None  # called after each optimizer step with its number
        self._gc_t0 = 0.0  # full (generation 2) garbage collections: host ms in this step

        def on_gc(phase: str, info: dict) -> None:
            if info.get("generation") == 2:
                if phase == "start":
                    self._gc_t0 = time.perf_counter()
                else:
                    self.cur["full_gc"] += time.perf_counter() - self._gc_t0
        gc.callbacks.append(on_gc)
        self._on_gc = on_gc  # until close()
        run, fin, opt = trainer.runners.run, trainer.runners.finish, trainer.optimizer_step
        # the modes whose batch costs only estimate their steps (text charged by characters,
        # train.cost_from_content=false): counted exactly here, from the prepared contents
        supports = getattr(getattr(trainer, "model", None), "supports", {})
        recount = {m for m, sup in supports.items() if sup.cost_estimated
                   and not getattr(trainer.runners, "cost_from_content", False)}

        from torch.profiler import record_function  # named ranges in --trace profiles

        def close_gap() -> None:  # at a model call's or optimizer step's start
            if self._gap_start is not None:
                e = self._events()
                e.record()
                # a gap opened by an optimizer step is the one between windows
                self._gaps.append((len(self.steps) + 1, self._gap_start, e, self._gap_opt))
                self._gap_start = None

        def open_gap(opt: bool = False) -> None:  # at a model call's or optimizer step's end
            if self._events is not None:
                self._gap_start, self._gap_opt = self._events(), opt
                self._gap_start.record()

        def timed_run(mode, batch):
            close_gap()
            t = time.perf_counter()
            try:
                with record_function(f"bench:run:{mode}"):
                    return run(mode, batch)
            finally:
                open_gap()
                dt = time.perf_counter() - t
                self.cur["model"] += dt
                est = getattr(batch, "cost", batch.padded_cost)
                grid, real = batch.padded_cost, est
                if mode in recount and batch.requests:
                    n = supports[mode].steps_of([r.targets for r in batch.requests])
                    grid, real = len(n) * max(n), sum(n)
                self.batches.append((mode, len(batch.requests), grid, real, dt * 1e3, est))

        def timed_finish(contexts):
            close_gap()
            t = time.perf_counter()
            try:
                with record_function("bench:finish"):
                    return fin(contexts)
            finally:
                open_gap()
                self.cur["model"] += time.perf_counter() - t

        def timed_opt():
            tokens = trainer.runners.window.tokens
            states = trainer.runners.window.state_bytes
            close_gap()
            t = time.perf_counter()
            with record_function("bench:optimizer_step"):
                opt()
                if sync:  # the GPU's backward and optimizer time counted here, not later
                    _sync()
                open_gap(opt=True)
            end = time.perf_counter()
            self.cur["optimizer"] += end - t
            self.steps.append(dict(self.cur, end=end, tokens=tokens, states=states,
                                   batches=len(self.batches),
                                   epoch=getattr(trainer, "epoch", None), peak=_peak_gib()))
            self.cur.clear()
            self.hook(len(self.steps))

        trainer.runners.run, trainer.runners.finish = timed_run, timed_finish
        trainer.optimizer_step = timed_opt

    def close(self) -> None:
        """Stop timing the garbage collector (its callback is process-wide)."""
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def _gpu_gaps(self, first: int, last: int, wall: float) -> dict:
        """Per step first+1 .. last: GPU ms in the host's data work (every interval between one
        call's work and the next call; ``gpu_window_gap_ms``: the one between the previous
        optimizer step and the step's first model call), and their share of ``wall``."""
        if self._events is None:
            return {}
        try:
            _sync()
            gaps: dict[int, float] = defaultdict(float)
            window: dict[int, float] = defaultdict(float)
            for n, a, b, opt in self._gaps:
                if first < n <= last:
                    ms = a.elapsed_time(b)
                    gaps[n] += ms
                    if opt:
                        window[n] += ms
        except Exception as e:  # noqa: BLE001 - a diagnostic must not cost the run's figures
            return {"gpu_data_gap_error": f"{type(e).__name__}: {e}"[:300]}
        steps = range(first + 1, last + 1)
        ms = [round(gaps[n], 1) for n in steps]
        return {"gpu_data_gap_ms": ms, "gpu_window_gap_ms": [round(window[n], 1) for n in steps],
                "share_gpu_data_gap": round(sum(ms) / 1e3 / wall, 3)}

    def _per_step(self, first: dict, sel: list[dict]) -> tuple[list[float], list[int]]:
        """Each step's host wall ms and real tokens (its batches' unpadded costs)."""
        ms, real = [], []
        for p, s in zip([first] + sel[:-1], sel):
            ms.append((s["end"] - p["end"]) * 1e3)
            real.append(sum(b[3] for b in self.batches[p["batches"]:s["batches"]]))
        return ms, real

    def summary(self, first: int, params: int, last: int | None = None) -> dict:
        """Figures over steps first+1 .. last (1-based; all after ``first`` when None; their
        wall time runs from step first's end)."""
        if len(self.steps) <= first:
            return {"error": f"only {len(self.steps)} optimizer steps ran (warm-up {first})"}
        a, sel = self.steps[first - 1], self.steps[first:last]
        wall = sel[-1]["end"] - a["end"]
        model = sum(s.get("model", 0.0) for s in sel)
        opt = sum(s.get("optimizer", 0.0) for s in sel)
        nb = sel[-1]["batches"] - a["batches"]
        per_mode: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
        window = self.batches[a["batches"]:sel[-1]["batches"]]
        for mode, n, padded, cost, _, est in window:
            for i, v in enumerate((1, n, padded, cost, est)):
                per_mode[mode][i] += v
        tokens = sum(v[2] for v in per_mode.values())  # the model's grids: padded steps
        real = sum(v[3] for v in per_mode.values())
        step_ms, step_real = self._per_step(a, sel)
        return {"steps": len(sel), "wall_s": round(wall, 2), "tokens": tokens,
                "tokens_per_s": round(tokens / wall), "real_tokens_per_s": round(real / wall),
                # the cost model's count (what the reports before the twenty-fourth session
                # called real: text estimated from characters, ~9% under its tokens)
                "estimated_real_tokens_per_s": round(sum(v[4] for v in per_mode.values()) / wall),
                "grid_padding": round(1 - real / tokens, 3) if tokens else None,
                "mfu": round(6 * params * real / wall / PEAK_TFLOPS / 1e12, 4),
                "share_model_calls": round(model / wall, 3),
                "share_backward_optimizer": round(opt / wall, 3),
                "share_data_wait": round(max(wall - model - opt, 0.0) / wall, 3),
                "batches_per_step": round(nb / len(sel), 1),
                # per step: host ms outside model calls and the optimizer step (epoch turnovers
                # of a small dataset show up as single large values)
                "data_wait_ms": [round(ms - (s.get("model", 0.0) + s.get("optimizer", 0.0)) * 1e3)
                                 for ms, s in zip(step_ms, sel)],
                "epoch_per_step": [s.get("epoch") for s in sel],
                # per step: host wall ms and real tokens, and real tokens/s over each quarter of
                # the window's steps: whether a long run slows down as it goes (P143, P147)
                "step_ms": [round(ms, 1) for ms in step_ms],
                "step_real_tokens": step_real,
                "real_tokens_per_s_by_quarter": _quarters(step_ms, step_real),
                **self._gpu_gaps(first, first + len(sel), wall),
                # per step: host ms in full garbage collections (inside the data wait or not)
                "full_gc_ms": [round(s.get("full_gc", 0.0) * 1e3) for s in sel],
                # the slowest model calls (host ms, which include syncs and graph captures):
                # [mode, requests, padded tokens, ms]
                "slowest_batches": [[m, n, p, round(ms)] for m, n, p, _, ms, _ in
                                    sorted(window, key=lambda b: -b[4])[:6]],
                "batches": {m: {"n": v[0], "requests_mean": round(v[1] / v[0], 1),
                                "padded_tokens_mean": round(v[2] / v[0]),
                                "grid_padding": round(1 - v[3] / v[2], 3) if v[2] else None}
                            for m, v in sorted(per_mode.items())}}


def _quarters(step_ms: list[float], step_real: list[int]) -> list[int]:
    """Real tokens/s over each quarter of the steps (fewer parts with fewer than 4 steps)."""
    n = len(step_ms)
    bounds = sorted({round(i * n / 4) for i in range(5)})
    return [round(sum(step_real[i:j]) / (sum(step_ms[i:j]) / 1e3))
            for i, j in zip(bounds, bounds[1:]) if sum(step_ms[i:j]) > 0]


def _cuda_events():
    import torch

    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.Event(enable_timing=True)


def _peak_gib() -> float | None:
    """The peak CUDA memory allocated since the last call (GiB; None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


ALLOC_KEYS = ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
# the pinned host allocator's (the batches' host-to-device copies): blocks made and returned to
# CUDA, and the milliseconds spent making them (cudaHostAlloc page-locks memory: slow, blocking)
HOST_KEYS = ("num_host_alloc", "num_host_free", "host_alloc_ms")


def alloc_counts() -> dict[str, float] | None:
    """The CUDA caching allocators' cumulative counters (None without CUDA): device mallocs
    and frees (each ``cudaFree`` waits for the whole device: the GPU's queue drains), retries
    after a failed malloc (the cache emptied and the malloc tried again) and full syncs; and
    the pinned host allocator's blocks made and returned and ms spent making them (where this
    PyTorch reports them)."""
    import torch

    if not torch.cuda.is_available():
        return None
    st = torch.cuda.memory_stats()
    out: dict[str, float] = {k: int(st.get(k, 0)) for k in ALLOC_KEYS}
    host = getattr(torch.cuda, "host_memory_stats", None)
    if host is not None:
        hs = host()
        out.update(num_host_alloc=int(hs.get("num_host_alloc", 0)),
                   num_host_free=int(hs.get("num_host_free", 0)),
                   host_alloc_ms=float(hs.get("host_alloc_time.total", 0)) / 1e3)
    return out


def alloc_per_step(before: dict[str, float] | None, after: dict[str, float] | None,
                   steps: int) -> dict[str, float] | None:
    """Counter deltas of :func:`alloc_counts` between two readings, per optimizer step (the
    counters both readings have)."""
    if before is None or after is None or steps <= 0:
        return None
    keys = [k for k in ALLOC_KEYS + HOST_KEYS if k in before and k in after]
    return {k: round((after[k] - before[k]) / steps, 2) for k in keys}
