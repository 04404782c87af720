"""``blocktool bench train``: training throughput of a preset on the GPU, where the step goes.

For each dataset and each variant (stack off / on with the eager loop / compiled / CUDA graphs) it
builds a fresh :class:`blocklm.tools.train.loop.Trainer`, runs ``--warmup`` optimizer steps (the
first compiles and autotunes), times optimizer steps until ``--steps`` or ``--seconds``, then
optionally profiles ``--profile-steps`` more with torch.profiler (GPU kernel time per category).
All variants run in the same process, side by side.

Timing: host wall time per optimizer step, split into model calls (the runners' forward,
including their host syncs), the optimizer step (backward, clipping, AdamW; synchronised at its
end unless the trainer reads its step figures a step late) and the rest: the dispatcher and the
loader (``share_data_wait``). On CUDA, ``share_gpu_data_gap`` is the GPU's own idle between an
optimizer step's work and the next window's first model call (CUDA events): the part of the data
work the GPU did not overlap. Tokens
are padded decoder steps (what the trainer counts), real tokens the blocks' own. MFU counts
6 x parameters x real tokens/s (all parameters; the attention's and the stack's own arithmetic
is not in it) against 989 TFLOP/s, the H200's dense bf16 peak.
"""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click

from .bench_train_sim import simulate_dispatch

PEAK_TFLOPS = 989.0  # H200 SXM dense bf16
VARIANTS = {
    "off": ["model.decoder.stack.enabled=false"],
    "eager": ["model.decoder.stack.enabled=true", "model.decoder.stack.compile=false",
              "model.decoder.stack.graphs=false", "model.decoder.stack.fused=false"],
    "compiled": ["model.decoder.stack.enabled=true", "model.decoder.stack.compile=true",
                 "model.decoder.stack.graphs=false", "model.decoder.stack.fused=false"],
    "graphs": ["model.decoder.stack.enabled=true", "model.decoder.stack.graphs=true",
               "model.decoder.stack.fused=false"],
    "fused": ["model.decoder.stack.enabled=true", "model.decoder.stack.graphs=true",
              "model.decoder.stack.fused=true", "model.decoder.stack.fused_ctrl=false"],
    "ctrl": ["model.decoder.stack.enabled=true", "model.decoder.stack.graphs=true",
             "model.decoder.stack.fused_ctrl=true",
             "model.decoder.stack.ring=false"],  # one kernel per ponder iteration
    "ring": ["model.decoder.stack.enabled=true", "model.decoder.stack.graphs=true",
             "model.decoder.stack.fused_ctrl=true", "model.decoder.stack.ring=true"],
}
_KERNEL_KINDS = (  # first match wins: (category, substrings of the CUDA kernel name)
    ("banked attention (Triton)", ("fwd_h", "fwd_o", "bwd_dh", "bwd_dqk", "bwd_dv", "bwd_hdot",
                                   "bwd_decay", "bwd_prep", "decay_prep", "bwd_mem",
                                   "bwd_intra")),
    ("stack (Triton)", ("_iter_fwd", "_iter_bwd", "ctrl")),
    ("stack (Inductor)", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("matmul", ("gemm", "sm90", "cutlass", "cublas", "nvjet", "splitk")),
)


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepTimer:
    """Wraps a trainer's runners and optimizer step with host timers (per optimizer step)."""

    def __init__(self, trainer, sync: bool = True, events=None) -> None:
        self.tr, self.sync = trainer, sync
        # the GPU's own clock, where there is one: an event after each optimizer step and one
        # before the next window's first model call; the GPU time between them is the GPU idle
        # while the host did the data work (``gpu_data_gap_ms``), whether or not the host waited
        # for the GPU at the step's end. ``events``: a factory of objects with record() and
        # elapsed_time(other) in ms (torch.cuda.Event); None: CUDA's when it is there.
        self._events = events if events is not None else _cuda_events()
        self._gap_start = None  # the event after the last optimizer step, until a model call
        self._gaps: list[tuple[int, object, object]] = []  # (step it opens, after opt, before run)
        self.cur: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []
        # mode, requests, padded, real cost, host ms of the model call
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

        from torch.profiler import record_function  # named ranges in --trace profiles

        def close_gap() -> None:  # at the window's first model call (a batch or end heads)
            if self._gap_start is not None:
                e = self._events()
                e.record()
                self._gaps.append((len(self.steps) + 1, self._gap_start, e))
                self._gap_start = None

        def timed_run(mode, batch):
            close_gap()
            t = time.perf_counter()
            try:
                with record_function(f"bench:run:{mode}"):
                    return run(mode, batch)
            finally:
                dt = time.perf_counter() - t
                self.cur["model"] += dt
                self.batches.append((mode, len(batch.requests), batch.padded_cost,
                                     getattr(batch, "cost", batch.padded_cost), dt * 1e3))

        def timed_finish(contexts):
            close_gap()
            t = time.perf_counter()
            try:
                with record_function("bench:finish"):
                    return fin(contexts)
            finally:
                self.cur["model"] += time.perf_counter() - t

        def timed_opt():
            tokens = trainer.runners.window.tokens
            t = time.perf_counter()
            with record_function("bench:optimizer_step"):
                opt()
                if sync:  # the GPU's backward and optimizer time counted here, not later
                    _sync()
                if self._events is not None:
                    self._gap_start = self._events()
                    self._gap_start.record()
            end = time.perf_counter()
            self.cur["optimizer"] += end - t
            self.steps.append(dict(self.cur, end=end, tokens=tokens, batches=len(self.batches),
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
        """Per step first+1 .. last: GPU ms between the previous optimizer step's work and the
        step's first model call's (the GPU idle for data), and their share of ``wall``."""
        if self._events is None:
            return {}
        try:
            _sync()
            gaps = {n: a.elapsed_time(b) for n, a, b in self._gaps if first < n <= last}
        except Exception as e:  # noqa: BLE001 - a diagnostic must not cost the run's figures
            return {"gpu_data_gap_error": f"{type(e).__name__}: {e}"[:300]}
        ms = [round(gaps[n], 1) if n in gaps else None for n in range(first + 1, last + 1)]
        return {"gpu_data_gap_ms": ms,
                "share_gpu_data_gap": round(sum(m for m in ms if m) / 1e3 / wall, 3)}

    def summary(self, first: int, params: int, last: int | None = None) -> dict:
        """Figures over steps first+1 .. last (1-based; all after ``first`` when None; their
        wall time runs from step first's end)."""
        if len(self.steps) <= first:
            return {"error": f"only {len(self.steps)} optimizer steps ran (warm-up {first})"}
        a, sel = self.steps[first - 1], self.steps[first:last]
        wall = sel[-1]["end"] - a["end"]
        tokens = sum(s["tokens"] for s in sel)
        model = sum(s.get("model", 0.0) for s in sel)
        opt = sum(s.get("optimizer", 0.0) for s in sel)
        tps = tokens / wall
        nb = sel[-1]["batches"] - a["batches"]
        per_mode: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
        window = self.batches[a["batches"]:sel[-1]["batches"]]
        for mode, n, padded, cost, _ in window:
            for i, v in enumerate((1, n, padded, cost)):
                per_mode[mode][i] += v
        real = sum(v[3] for v in per_mode.values())
        return {"steps": len(sel), "wall_s": round(wall, 2), "tokens": tokens,
                "tokens_per_s": round(tps), "real_tokens_per_s": round(real / wall),
                "mfu": round(6 * params * real / wall / PEAK_TFLOPS / 1e12, 4),
                "share_model_calls": round(model / wall, 3),
                "share_backward_optimizer": round(opt / wall, 3),
                "share_data_wait": round(max(wall - model - opt, 0.0) / wall, 3),
                "batches_per_step": round(nb / len(sel), 1),
                # per step: host ms outside model calls and the optimizer step (epoch turnovers
                # of a small dataset show up as single large values)
                "data_wait_ms": [round((s["end"] - p["end"] - s.get("model", 0.0)
                                        - s.get("optimizer", 0.0)) * 1e3)
                                 for p, s in zip([a] + sel[:-1], sel)],
                "epoch_per_step": [s.get("epoch") for s in sel],
                **self._gpu_gaps(first, first + len(sel), wall),
                # per step: host ms in full garbage collections (inside the data wait or not)
                "full_gc_ms": [round(s.get("full_gc", 0.0) * 1e3) for s in sel],
                # the slowest model calls (host ms, which include syncs and graph captures):
                # [mode, requests, padded tokens, ms]
                "slowest_batches": [[m, n, p, round(ms)] for m, n, p, _, ms in
                                    sorted(window, key=lambda b: -b[4])[:6]],
                "batches": {m: {"n": v[0], "requests_mean": round(v[1] / v[0], 1),
                                "padded_tokens_mean": round(v[2] / v[0])}
                            for m, v in sorted(per_mode.items())}}


def _cuda_events():
    import torch

    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.Event(enable_timing=True)


class Phases:
    """Warm-up steps, then timed steps (until ``steps`` or ``seconds``), then ``profile_steps``
    profiled ones. Profiling after the timing keeps the timed window on the same batches
    whether a run profiles or not (profiling first shifted it: thru-A/B compared mixed windows
    holding 3 and 5 image batches)."""

    def __init__(self, warmup: int, steps: int, seconds: float, profile_steps: int) -> None:
        self.warmup, self.steps, self.seconds = warmup, steps, seconds
        self.profile_steps = profile_steps
        self.t_timed: float | None = None  # when the timing started (after the warm-up)
        self.timed_end: int | None = None  # the last timed step

    def after(self, n: int, now: float) -> str | None:
        """What to do after optimizer step n (1-based): "profile" (start the profiler),
        "stop_profile" (stop it and end the run), "stop" (end the run) or None."""
        if n == self.warmup:
            self.t_timed = now
        if self.timed_end is None:
            if n > self.warmup and (n >= self.warmup + self.steps
                                    or now - self.t_timed >= self.seconds):
                self.timed_end = n
                return "profile" if self.profile_steps else "stop"
            return None
        return "stop_profile" if n >= self.timed_end + self.profile_steps else None


def _peak_gib() -> float | None:
    """The peak CUDA memory allocated since the last call (GiB; None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    peak = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return round(peak, 1)


def kernel_breakdown(prof) -> dict:
    """GPU kernel time per category (ms) from a torch.profiler run."""
    out: dict[str, float] = defaultdict(float)
    top = []
    for ev in prof.key_averages():
        ms = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)) / 1e3
        if ms <= 0 or ev.key.startswith(("ProfilerStep", "bench:", "blocklm:")) \
                or not _is_kernel(ev):  # the named ranges are not kernels
            continue
        name = ev.key.lower()
        kind = next((k for k, subs in _KERNEL_KINDS if any(s in name for s in subs)), "other")
        out[kind] += ms
        top.append((ms, ev.count, ev.key[:90]))
    top.sort(reverse=True)
    return {"by_kind_ms": {k: round(v, 1) for k, v in sorted(out.items(), key=lambda x: -x[1])},
            "top": [{"ms": round(ms, 2), "calls": n, "kernel": k} for ms, n, k in top[:24]]}


def _is_kernel(ev) -> bool:
    dt = getattr(ev, "device_type", None)
    return dt is not None and "CUDA" in str(dt) and ev.self_device_time_total > 0 \
        if hasattr(ev, "self_device_time_total") else "CUDA" in str(dt)


def _captures(model) -> int:
    """Stack graph runners captured so far by the model's processing stack(s)."""
    from blocklm.model.stack import ProcessingStack
    from blocklm.model.stack_graph import graph_captures

    return sum(graph_captures(m) for m in model.modules() if isinstance(m, ProcessingStack))


def run_variant(data: str, variant: str, extra: list[str], warmup: int, steps: int,
                seconds: float, profile_steps: int, preset: str = "small",
                trace: str | None = None) -> dict:
    """One fresh trainer on ``data`` with the variant's overrides; its figures. One ``fit`` call
    (the dispatcher cannot restart mid-epoch); the timer's hooks start and stop the profiler and
    end the run (``trainer.target``) after ``steps`` timed steps or ``seconds``."""
    import torch

    from blocklm.tools.train.loop import RunSpec, Trainer

    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(preset=preset, data=[data],
                       overrides=VARIANTS[variant] + ["train.log_every=1",
                                                      "train.checkpoint_every=0"] + extra)
        tr = Trainer(Path(tmp) / "run", spec, resume=False, remote=None, progress=False,
                     tensorboard=False)
        params = sum(p.numel() for p in tr.model.parameters())
        tr.checkpoint = lambda: None  # the folder is deleted unread (a chained mixed run's
        # in-flight contexts made its closing checkpoint cost more than its timed steps)
        # a trainer that reads its step figures a step late (train.async_log) does not wait
        # for the GPU at the step's end; the timer must not add that wait (tokens/s is the
        # figure then: data work that overlaps the GPU's backward still counts as data wait)
        timer = StepTimer(tr, sync=not getattr(tr, "async_log", False))
        phases = Phases(warmup, steps, seconds, profile_steps)
        state: dict = {"t0": time.perf_counter()}

        def hook(n: int, tr=tr) -> None:  # called after optimizer step n (1-based)
            now = time.perf_counter()
            if n == warmup:
                state["warmup_s"] = now - state["t0"]
                state["captures"] = _captures(tr.model)
            act = phases.after(n, now)
            if act in ("profile", "stop"):  # the timed window's stack graph captures
                state["captures"] = _captures(tr.model) - state.get("captures", 0)
            if act == "profile":
                from torch.profiler import ProfilerActivity, profile

                state["prof"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                state["prof"].__enter__()
                state["tp"] = now
            elif act == "stop_profile":
                state["prof"].__exit__(None, None, None)
                state["profile"] = dict(kernel_breakdown(state["prof"]), steps=profile_steps,
                                        wall_ms=round((now - state["tp"]) * 1e3, 1))
                if trace:
                    from .bench_train_prof import export_profile

                    state["profile"].update(export_profile(
                        state["prof"], trace, f"{Path(data).name}_{variant}"))
            if act in ("stop", "stop_profile") or now - state["t0"] >= seconds + 600:
                tr.target = n
        timer.hook = hook
        failed = None
        try:
            tr.fit(steps=10**9, minutes=None)
        except Exception as e:  # keep the steps that ran (an out-of-memory: which window)
            failed = f"{type(e).__name__}: {e}"[:2000]
        finally:
            timer.close()
        res: dict = {"data": data, "variant": variant, "params": params,
                     "chain_epochs": tr.t.chain_epochs, "overrides": list(extra),
                     "warmup_s": round(state.get("warmup_s", -1.0), 1)}
        res["stack_graph_captures"] = state.get("captures")  # in the timed steps
        res["synced_steps"] = timer.sync
        # samples the dispatcher rejected (bad data, counted by kind): a run that lost a mode
        # (every audio block rejected, say) must not pass for a fast one
        res["rejected"] = {k[len("rejected_"):]: v for k, v in tr.disp.counts.items()
                           if k.startswith("rejected_")}
        if "profile" in state:
            res["profile"] = state["profile"]
        res.update(timer.summary(warmup, params, phases.timed_end) if warmup
                   else {"error": "no warm-up step"})
        peaks = [p for p in [s.get("peak") for s in timer.steps] + [_peak_gib()]
                 if p is not None]  # every step's, warm-up included, and since the last
        res["peak_gib"] = max(peaks) if peaks else None
        # every step's (warm-up included) window: padded tokens (thousands) and the peak memory
        # (GiB) of its forward, backward and optimizer step (train.window_max)
        res["window_ktokens_peak_gib"] = [[round(s["tokens"] / 1e3), s.get("peak")]
                                          for s in timer.steps]
        if failed is not None:
            res["error"] = failed
        del tr
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        return res


@click.command("train")
@click.option("--preset", default="small", show_default=True, help="Run preset.")
@click.option("--data", "datas", multiple=True, default=["data/shards/text", "data/shards/mixed"],
              show_default=True, help="Dataset folder (repeat for several).")
@click.option("--variants", default="off,compiled", show_default=True,
              help=f"Comma-separated, of: {', '.join(VARIANTS)}.")
@click.option("--set", "extra", multiple=True, help="Extra key=value overrides for every run.")
@click.option("--warmup", default=2, show_default=True, help="Optimizer steps not timed.")
@click.option("--steps", default=20, show_default=True, help="Timed optimizer steps (at most).")
@click.option("--seconds", default=60.0, show_default=True, help="Time cap per variant.")
@click.option("--profile-steps", default=0, show_default=True,
              help="Steps profiled (torch.profiler) after the timed steps.")
@click.option("--simulate", is_flag=True,
              help="Only simulate the dispatcher on the CPU (batches, sequential steps, padding).")
@click.option("--sim-epochs", default=4, show_default=True,
              help="With --simulate: epochs simulated, chained as the trainer chains them "
                   "(train.chain_epochs) or one run per epoch.")
@click.option("--out", "out_path", default=None, help="Also write the JSON figures here.")
@click.option("--trace", default=None,
              help="With --profile-steps: write chrome traces and op tables to this folder.")
def bench_train(preset, datas, variants, extra, warmup, steps, seconds, profile_steps, simulate,
                sim_epochs, out_path, trace):
    """Training tokens/s, MFU and the data-wait share of a preset (`small`), per variant.

    \b
    Example:
      blocktool bench train --variants off,eager --seconds 60 --profile-steps 2
      blocktool bench train --simulate --set train.bucket_max_width=0.06
      blocktool bench train --simulate --sim-epochs 4 --data data/gpu_mixed4
      blocktool bench train --simulate --set train.chain_epochs=false  # one run per epoch
      blocktool bench train --variants off --profile-steps 1 --trace prof/
    """
    if simulate:
        for data in datas:
            click.echo(json.dumps(simulate_dispatch(preset, data, list(extra), sim_epochs)))
        return
    rows = []
    for data in datas:
        for v in variants.split(","):
            try:
                r = run_variant(data, v, list(extra), warmup, steps, seconds, profile_steps,
                                preset, trace)
            except Exception as e:  # one failing variant must not lose the others' figures
                r = {"data": data, "variant": v, "error": f"{type(e).__name__}: {e}"[:2000]}
            rows.append(r)
            click.echo(json.dumps(r), err=True)
            if out_path:
                Path(out_path).write_text(json.dumps(rows, indent=1))
    click.echo(f"{'data':<22} {'variant':<9} {'tokens/s':>9} {'MFU':>6} {'model':>6} "
               f"{'bwd+opt':>7} {'data':>6} {'batches/step':>12}")
    for r in rows:
        if "tokens_per_s" not in r:
            click.echo(f"{r['data']:<22} {r['variant']:<9} {r.get('error', '')[:80]}")
            continue
        click.echo(f"{r['data']:<22} {r['variant']:<9} {r['tokens_per_s']:>9} {r['mfu']:>6.3f} "
                   f"{r['share_model_calls']:>6.2f} {r['share_backward_optimizer']:>7.2f} "
                   f"{r['share_data_wait']:>6.2f} {r['batches_per_step']:>12}"
                   + (f"  rejected {r['rejected']}" if r.get("rejected") else ""))


if __name__ == "__main__":
    bench_train()
