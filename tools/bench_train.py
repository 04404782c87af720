"""``blocktool bench train``: training throughput of a preset on the GPU, where the step goes.

For each dataset and each variant (stack off / on with the eager loop / compiled / CUDA graphs) it
builds a fresh :class:`blocklm.tools.train.loop.Trainer`, runs ``--warmup`` optimizer steps (the
first compiles and autotunes), times optimizer steps until ``--steps`` or ``--seconds``, then
optionally profiles ``--profile-steps`` more with torch.profiler (GPU kernel time per category).
All variants run in the same process, side by side.

Timing: host wall time per optimizer step, split into model calls (the runners' forward,
including their host syncs), the optimizer step (backward, clipping, AdamW; synchronised at its
end unless the trainer reads its step figures a step late) and the rest: the dispatcher and the
loader (``share_data_wait``). On CUDA, ``share_gpu_data_gap`` is the GPU's own time in those
intervals (CUDA events after each model call's and optimizer step's work and before the next:
the GPU idle, or running the dispatcher's state moves, while the host did the data work; the part
of the data work the GPU did not overlap); ``gpu_window_gap_ms`` its part between an optimizer
step and the next window's first call. ``step_ms`` and ``step_real_tokens`` give each timed
step, and ``real_tokens_per_s_by_quarter`` the throughput over each quarter of them (a long run
that slows down as it goes shows it there). A run that ends inside its window (an error, a
signal) keeps the steps it ran, says so in ``cut_short``, and counts over those steps. Tokens
are padded decoder steps (what the trainer counts), real tokens the blocks' own. MFU counts
6 x parameters x real tokens/s (all parameters; the attention's and the stack's own arithmetic
is not in it) against 989 TFLOP/s, the H200's dense bf16 peak.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click

from .bench_machine import describe, fingerprint_or_error
from .bench_train_idle import PhaseMarks, cuda_kernels, idle_by_phase
from .bench_train_sim import simulate_dispatch
from .bench_train_timer import StepTimer, _peak_gib, alloc_counts, alloc_per_step

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
    # the stack's kernels per iteration and per chunk (the chunk ones were "other" until P78)
    ("stack (Triton)", ("_iter_fwd", "_iter_bwd", "_chunk_fwd", "_chunk_bwd", "ctrl")),
    # Inductor's kernels: the compiled element heads (and the layers with compile_layers)
    ("compiled (Inductor)", ("triton_",)),
    ("optimizer", ("adam", "multi_tensor")),
    ("matmul", ("gemm", "sm90", "cutlass", "cublas", "nvjet", "splitk")),
)


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


def kernel_kind(name: str) -> str:
    """The category of a CUDA kernel's name in :func:`kernel_breakdown` (first match wins)."""
    low = name.lower()
    return next((k for k, subs in _KERNEL_KINDS if any(s in low for s in subs)), "other")


def kernel_breakdown(prof) -> dict:
    """GPU kernel time per category (ms) from a torch.profiler run."""
    out: dict[str, float] = defaultdict(float)
    top = []
    for ev in prof.key_averages():
        ms = getattr(ev, "device_time_total", getattr(ev, "cuda_time_total", 0.0)) / 1e3
        if ms <= 0 or ev.key.startswith(("ProfilerStep", "bench:", "blocklm:")) \
                or not _is_kernel(ev):  # the named ranges are not kernels
            continue
        out[kernel_kind(ev.key)] += ms
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


def _window_counts(state: dict, model, steps: int) -> None:
    """The timed window's stack graph captures, Dynamo compiles and caching-allocator counts per
    step (mallocs, frees, retries) in ``state``: the readings taken at the warm-up's end
    subtracted from now, over ``steps`` timed steps."""
    state["captures"] = _captures(model) - state.get("captures", 0)
    state["compiles"] = _compiles() - state.get("compiles", 0)
    state["alloc"] = alloc_per_step(state.get("alloc"), alloc_counts(), steps)


def _compiles() -> int:
    """Graphs Dynamo has compiled in this process so far (a recompile counts: a new shape past a
    guard). One inside a timed window is a one-off stall of ~1-7 s that a long run pays once;
    gpu_mixed4's largest audio batch did this in most windows until its loss slices stayed
    under 2**31 logits (GPU_NOTES P108)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:  # pragma: no cover - a torch without Dynamo
        return 0
    return int(counters["stats"]["unique_graphs"])


def run_variant(data: str, variant: str, extra: list[str], warmup: int, steps: int,
                seconds: float, profile_steps: int, preset: str = "small",
                trace: str | None = None, idle: bool = False, alloc_trace: bool = False) -> dict:
    """One fresh trainer on ``data`` with the variant's overrides; its figures. One ``fit`` call
    (the dispatcher cannot restart mid-epoch); the timer's hooks start and stop the profiler and
    end the run (``trainer.target``) after ``steps`` timed steps or ``seconds``. ``idle``: the
    profiled steps record CUDA activity only, with phase markers (bench_train_idle.py), and
    report where the GPU idled (``idle``). ``alloc_trace``: the profiled steps also record the
    CUDA allocator's history, read by :func:`.bench_train_alloc.segment_events`
    (``alloc_trace``)."""
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
                state["compiles"] = _compiles()
                state["alloc"] = alloc_counts()
            act = phases.after(n, now)
            state["last"] = n
            if act in ("profile", "stop"):
                _window_counts(state, tr.model, n - warmup)
            if act == "profile":
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CUDA] if idle else \
                    [ProfilerActivity.CPU, ProfilerActivity.CUDA]
                state["prof"] = profile(activities=acts)
                state["prof"].__enter__()
                if alloc_trace and torch.cuda.is_available():
                    from .bench_train_alloc import start_recording

                    start_recording()
                    state["alloc_trace"] = True
                if idle:
                    state["marks"] = PhaseMarks(tr)
                    state["marks"].on = True
                state["tp"] = now
            elif act == "stop_profile":
                marks = state.pop("marks", None)
                if marks is not None:
                    marks.on = False
                state["prof"].__exit__(None, None, None)
                if state.pop("alloc_trace", False):
                    from .bench_train_alloc import stop_recording

                    state["alloc_events"] = stop_recording(profile_steps)
                state["profile"] = dict(kernel_breakdown(state["prof"]), steps=profile_steps,
                                        wall_ms=round((now - state["tp"]) * 1e3, 1))
                if marks is not None:
                    marks.close()
                    try:
                        state["idle"] = idle_by_phase(cuda_kernels(state["prof"]), marks.labels)
                    except Exception as e:  # noqa: BLE001 - beside the figures, never instead
                        state["idle"] = {"error": f"{type(e).__name__}: {e}"[:300]}
                if trace:
                    from .bench_train_prof import export_profile

                    state["profile"].update(export_profile(
                        state["prof"], trace, f"{Path(data).name}_{variant}"))
            if act in ("stop", "stop_profile") or now - state["t0"] >= seconds + 600:
                tr.target = n
        timer.hook = hook
        failed, ended = None, {}
        try:
            ended = tr.fit(steps=10**9, minutes=None)
        except Exception as e:  # keep the steps that ran (an out-of-memory: which window)
            failed = f"{type(e).__name__}: {e}"[:2000]
        finally:
            timer.close()
        if state.pop("alloc_trace", False):  # the run ended while the allocator was recorded
            from .bench_train_alloc import stop_recording

            state["alloc_events"] = stop_recording(state["last"] - (phases.timed_end or 0))
        cut = None
        if "warmup_s" in state and phases.timed_end is None:
            # the run ended inside its window (an error, a signal, the data's end): until now
            # the counts held the totals at the warm-up's end (P151 reported those as the
            # window's: 1,774 device mallocs "a step", 2 compiles)
            done = state["last"] - warmup
            _window_counts(state, tr.model, done)
            why = failed.split(":")[0] if failed else f"stopped: {ended.get('stopped')}"
            cut = (f"the run ended after {done} timed step(s), before its window's end "
                   f"({why}); the figures cover those steps")
        res: dict = {"data": data, "variant": variant, "params": params,
                     "chain_epochs": tr.t.chain_epochs, "overrides": list(extra),
                     "warmup_s": round(state.get("warmup_s", -1.0), 1)}
        res["stack_graph_captures"] = state.get("captures")  # in the timed steps
        res["compiles"] = state.get("compiles")  # Dynamo graphs compiled in the timed steps
        res["allocator_per_step"] = state.get("alloc")  # CUDA allocator counters, timed steps
        res["synced_steps"] = timer.sync
        if cut is not None:
            res["cut_short"] = cut
        # samples the dispatcher rejected (bad data, counted by kind): a run that lost a mode
        # (every audio block rejected, say) must not pass for a fast one
        res["rejected"] = {k[len("rejected_"):]: v for k, v in tr.disp.counts.items()
                           if k.startswith("rejected_")}
        if "profile" in state:
            res["profile"] = state["profile"]
        if "idle" in state:
            res["idle"] = state["idle"]
        if alloc_trace:
            res["alloc_trace"] = state.get("alloc_events") or {
                "error": "needs CUDA and profiled steps that ran"}
        res.update(timer.summary(warmup, params, phases.timed_end) if warmup
                   else {"error": "no warm-up step"})
        peaks = [p for p in [s.get("peak") for s in timer.steps] + [_peak_gib()]
                 if p is not None]  # every step's, warm-up included, and since the last
        res["peak_gib"] = max(peaks) if peaks else None
        # every step's (warm-up included) window: padded tokens (thousands) and the peak memory
        # (GiB) of its forward, backward and optimizer step (train.window_max)
        res["window_ktokens_peak_gib"] = [[round(s["tokens"] / 1e3), s.get("peak")]
                                          for s in timer.steps]
        # and the recurrent states its batches held (GiB; train.window_max_state_gib)
        res["window_state_gib"] = [round(s["states"] / 2**30, 3) for s in timer.steps]
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
@click.option("--idle", is_flag=True,
              help="With --profile-steps, on CUDA: profile the GPU only, with marker kernels at "
                   "every host phase, and report where the GPU idled (batch set-up, data work "
                   "between calls, the backward's launch, ...).")
@click.option("--alloc-trace", is_flag=True,
              help="With --profile-steps, on CUDA: record the caching allocator's history over "
                   "the profiled steps and report the device mallocs and frees a step, by size "
                   "and by the named ranges open when they were needed (bench:run:image > "
                   "blocklm:head_bits, ...; alloc_trace). No stack traces: with them PyTorch "
                   "2.11 aborts a training run.")
@click.option("--simulate", is_flag=True,
              help="Only simulate the dispatcher on the CPU (batches, sequential steps, padding).")
@click.option("--sim-epochs", default=4, show_default=True,
              help="With --simulate: epochs simulated, chained as the trainer chains them "
                   "(train.chain_epochs) or one run per epoch.")
@click.option("--out", "out_path", default=None, help="Also write the JSON figures here.")
@click.option("--trace", default=None,
              help="With --profile-steps: write chrome traces and op tables to this folder.")
def bench_train(preset, datas, variants, extra, warmup, steps, seconds, profile_steps, idle,
                alloc_trace, simulate, sim_epochs, out_path, trace):
    """Training tokens/s, MFU and the data-wait share of a preset (`small`), per variant.

    A machine's first run is slower on the same steps (5-6% on an H200: its compile caches fill
    as it goes); for a steady figure run the command twice and read the second.

    \b
    Example:
      blocktool bench train --variants off,eager --seconds 60 --profile-steps 2
      blocktool bench train --simulate --set train.bucket_max_width=0.06
      blocktool bench train --simulate --sim-epochs 4 --data data/gpu_mixed4
      blocktool bench train --simulate --set train.chain_epochs=false  # one run per epoch
      blocktool bench train --variants off --profile-steps 1 --trace prof/
      blocktool bench train --variants ring --warmup 30 --profile-steps 3 --idle
      blocktool bench train --variants ring --warmup 30 --profile-steps 20 --alloc-trace
    """
    if alloc_trace and not profile_steps:
        raise click.UsageError("--alloc-trace records the profiled steps: give --profile-steps N")
    if simulate:
        for data in datas:
            click.echo(json.dumps(simulate_dispatch(preset, data, list(extra), sim_epochs)))
        return
    rows = []
    machine = fingerprint_or_error(spin_s=0.5)  # in every row, with the one after the runs
    for data in datas:
        for v in variants.split(","):
            try:
                r = run_variant(data, v, list(extra), warmup, steps, seconds, profile_steps,
                                preset, trace, idle, alloc_trace)
            except Exception as e:  # one failing variant must not lose the others' figures
                r = {"data": data, "variant": v, "error": f"{type(e).__name__}: {e}"[:2000]}
            r["machine"] = machine
            rows.append(r)
            click.echo(json.dumps(r), err=True)
            if out_path:
                Path(out_path).write_text(json.dumps(rows, indent=1))
    after = fingerprint_or_error(spin_s=0.0)  # the host's state changes (P158)
    for r in rows:
        r["machine_after"] = after
    if out_path:
        Path(out_path).write_text(json.dumps(rows, indent=1))
    click.echo(f"machine: {describe(machine)}; after the runs: {describe(after)}")
    # tokens/s counts padded decoder steps (what the trainer runs); "real" the blocks' own
    click.echo(f"{'data':<22} {'variant':<9} {'tokens/s':>9} {'real':>9} {'MFU':>6} "
               f"{'model':>6} {'bwd+opt':>7} {'data':>6} {'batches/step':>12}")
    for r in rows:
        if "tokens_per_s" not in r:
            click.echo(f"{r['data']:<22} {r['variant']:<9} {r.get('error', '')[:80]}")
            continue
        click.echo(f"{r['data']:<22} {r['variant']:<9} {r['tokens_per_s']:>9} "
                   f"{r['real_tokens_per_s']:>9} {r['mfu']:>6.3f} "
                   f"{r['share_model_calls']:>6.2f} {r['share_backward_optimizer']:>7.2f} "
                   f"{r['share_data_wait']:>6.2f} {r['batches_per_step']:>12}"
                   + (f"  rejected {r['rejected']}" if r.get("rejected") else ""))
        if r.get("cut_short"):
            click.echo(f"{'':<22} {r['cut_short']}")
        if r.get("compiles"):
            click.echo(f"{'':<22} {r['compiles']} graph compile(s) inside the timed window: "
                       f"one-off stalls a long run pays once (see slowest_batches)")
        a = r.get("alloc_trace") or {}
        if "mallocs" in a:
            click.echo(f"{'':<22} device mallocs {a['mallocs']['per_step']} a step "
                       f"({a['mallocs']['gib_per_step']} GiB), frees {a['frees']['per_step']} "
                       f"({a['frees']['gib_per_step']} GiB), out-of-memory retries "
                       f"{a['ooms']}; mallocs by size {a['mallocs']['by_size']}")
        if r.get("idle", {}).get("busy_share") is not None:
            i = r["idle"]
            click.echo(f"{'':<22} GPU busy {i['busy_share']:.1%}, idle in the data work "
                       f"{i['share_idle_data']:.1%}; idle ms by phase {i['idle_ms']}")


if __name__ == "__main__":
    bench_train()
