"""CPU proxy of an H200 host's data wait at epoch turnovers (``bench train``'s accounting).

On the H200 a text step is host-bound: the main thread spends most of a step in Python (kernel
launches), so a garbage collection or a busy helper thread stalls it wherever it falls, and the
~1.5 s epochs of the text set turn over every ~4 steps. Here the trainer's real loader, epoch
read-ahead and dispatcher run with the `small` preset's dispatch settings (8,192 in flight,
65,536-token steps) on ``--data``; the model is replaced by a Python spin that holds the GIL for
``--spin-us`` per padded token of each batch (model calls) and the optimizer step by a sleep of
``--opt-ms`` (backward + a CUDA sync: the GIL is free). The defaults give ~355 ms steps, as on
the H200. Per step it reports bench train's data wait (step wall minus model calls minus the
optimizer step) and the full (generation 2) garbage collections of the run.

``--spin-clock wall`` (the default) ends a model call at a wall-clock time: a helper thread that
takes the GIL meanwhile (the epoch read-ahead) costs the step nothing. ``--spin-clock cpu`` spins
until the main thread has run that long, as a host-bound step's launches must: time lost to a
helper thread then lengthens the model calls (not the data wait) and shows in ``ms/step``.

``--launch-us N`` makes the spin release the GIL every N us of it (``time.sleep(0)``), as the
H200's kernel launches do (Triton's launcher lets the GIL go around ``cuLaunchKernel``): a
helper thread with Python work to do then takes the GIL at each release and the spinning thread
waits for it to block or for the switch interval (5 ms), the convoy that made admission built in
the prefetch thread slower on the H200 (device call adm-1) while the plain spin showed a gain.
``--opt-spin-ms`` adds such a spin to the optimizer step (the backward's Python autograd
functions launch kernels too: its GIL is not free).

``--baseline DIR`` runs another checkout of blocklm (e.g. ``git worktree add /tmp/base HEAD``)
in alternating rounds with this one, each run in a fresh process.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click

TINY = ["model.decoder.d_model=64", "model.decoder.d_core=32", "model.decoder.d_ff=128",
        "model.decoder.attention.heads=2", "model.decoder.attention.head_dim=16",
        "model.decoder.layers=1", "model.heads.hidden=32", "model.decoder.stack.enabled=false",
        "model.modes.text.vocab_size=none", "train.device=cpu", "train.log_every=1",
        "train.checkpoint_every=0"]


def one_run(data: str, steps: int, warmup: int, spin_us: float, opt_ms: float,
            spin_clock: str = "wall", extra: tuple[str, ...] = (), launch_us: float = 0.0,
            opt_spin_ms: float = 0.0) -> dict:
    """One trainer in this process: per-step data wait (ms) and epoch, full collections."""
    from blocklm.pipeline.dispatch_types import Result
    from blocklm.tools.bench_train_timer import StepTimer
    from blocklm.tools.train.loop import RunSpec, Trainer

    full: list[tuple[str, float]] = []
    t0: list[float] = []

    def on_gc(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                t0[:] = [time.perf_counter()]
            elif t0:
                full.append((threading.current_thread().name,
                             round(1e3 * (time.perf_counter() - t0[0]), 1)))

    gc.callbacks.append(on_gc)
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(Path(tmp) / "run", RunSpec("small", [data], overrides=TINY + list(extra)),
                     resume=False, remote=None, progress=False, tensorboard=False)

        clock = time.thread_time if spin_clock == "cpu" else time.perf_counter

        def spin(seconds: float) -> None:  # Python holding the GIL, launches letting it go
            end = clock() + seconds
            if launch_us <= 0:
                while clock() < end:
                    pass
                return
            while True:
                t = clock()
                if t >= end:
                    return
                stop = min(end, t + launch_us * 1e-6)
                while clock() < stop:
                    pass
                time.sleep(0)  # a kernel launch: the GIL is released and taken back

        def run(mode, batch):  # the host's share of a model call
            spin(spin_us * 1e-6 * batch.padded_cost)
            tr.runners.window.tokens += batch.padded_cost
            return [Result(state=None) for _ in batch.requests]

        def optimizer_step():  # backward's launches (opt_spin_ms), then the GIL-free rest
            spin(opt_spin_ms / 1e3)
            time.sleep(opt_ms / 1e3)
            tr.runners.window.tokens = 0
            tr.step += 1

        tr.runners.run, tr.optimizer_step = run, optimizer_step
        # the trainer thread's admissions: one by one (chained: a few at every step) and
        # whole planned epochs (per-epoch runs' turnovers)
        import blocklm.pipeline.dispatch as dispatch

        admit = [0.0]

        def timed(fn):
            def call(*a):
                t = time.perf_counter()
                fn(*a)
                admit[0] += time.perf_counter() - t
            return call
        tr.disp._admit = timed(tr.disp._admit)
        planned = dispatch.admit_planned
        dispatch.admit_planned = timed(planned)
        timer = StepTimer(tr)
        at_warmup = [0.0]

        def hook(n: int) -> None:
            if n == warmup:
                at_warmup[0] = admit[0]
            if n >= warmup + steps:
                tr.target = n
        timer.hook = hook
        n0 = len(full)
        try:
            tr.fit(steps=10**9, minutes=None)
        finally:
            dispatch.admit_planned = planned
            timer.close()
        gc.callbacks.remove(on_gc)
        s = timer.summary(warmup, 1)
        return {"data_wait_ms": s["data_wait_ms"], "epoch": s["epoch_per_step"],
                "batches_per_step": s["batches_per_step"], "tokens_per_s": s["tokens_per_s"],
                "admit_ms_per_step": round((admit[0] - at_warmup[0]) * 1e3 / steps, 1),
                "share_data_wait": s["share_data_wait"], "ms_per_step":
                round(1e3 * s["wall_s"] / s["steps"]), "full_collections_ms": full[n0:]}


def time_admission(data: str, reps: int = 9, n: int = 7000) -> dict:
    """The admitting thread's microseconds per example, each ``DispatchConfig.admission`` in
    turn (interleaved reps, one process): ``n`` prepared samples of ``data`` in chunks of 32 as
    the prefetch thread hands them over ("prefetch": built and sealed beforehand, as there)."""
    import dataclasses
    import itertools

    from blocklm.pipeline.dispatch_admit import Feed, admission_builder, admit_from
    from blocklm.tools.train.loop import RunSpec, Trainer

    class Chunks:  # the prefetcher's hand-over, without its thread
        def __init__(self, chunks):
            self.chunks = iter(chunks)

        def next_chunk(self):
            return next(self.chunks, None)

        def taken(self, k):
            pass
    with tempfile.TemporaryDirectory() as tmp:
        tr = Trainer(Path(tmp) / "run", RunSpec("small", [data], overrides=TINY),
                     resume=False, remote=None, progress=False, tensorboard=False)
    d, cfg = tr.disp, tr.disp.config
    tr.source.set_epoch(0)
    items = [(i, s, d._prepare(s)) for i, s in enumerate(itertools.islice(tr.source, n))]
    got: dict[str, list[float]] = {m: [] for m in ("one_by_one", "inline", "prefetch")}
    for _ in range(reps):
        for mode, times in got.items():
            d.config = dataclasses.replace(cfg, admission=mode)
            d._in_flight.clear(), d._buckets.clear(), d._nonempty.clear()
            d._exhausted, d._seq, d._dead = False, 0, []
            fns = admission_builder(d)
            parts = [items[i:i + 32] for i in range(0, len(items), 32)]
            if mode == "prefetch":
                built = [list(map(fns["build"], c)) for c in parts]
                feed = Feed(Chunks([(c, b, fns["seal"](b)) for c, b in zip(parts, built)]))
            else:
                feed = Feed(Chunks([(c, None, None) for c in parts]),
                            fns.get("build") if mode == "inline" else None)
            gc.collect()
            gc.disable()
            t = time.perf_counter()
            admit_from(d, feed)
            times.append((time.perf_counter() - t) * 1e6 / len(d._in_flight))
            gc.enable()
    return {m: round(statistics.median(v), 2) for m, v in got.items()}


def split(r: dict) -> tuple[list[int], list[int]]:
    """(data wait of each epoch's first step, of the other steps)."""
    w, e = r["data_wait_ms"], r["epoch"]
    first = [i for i in range(1, len(w)) if e[i] != e[i - 1]]
    return [w[i] for i in first], [w[i] for i in range(len(w)) if i not in first]


@click.command("turnover")
@click.option("--data", default="data/shards/text", show_default=True)
@click.option("--steps", default=15, show_default=True, help="Timed optimizer steps per run.")
@click.option("--warmup", default=2, show_default=True)
@click.option("--spin-us", default=3.0, show_default=True,
              help="Host microseconds per padded token of a batch (model calls).")
@click.option("--opt-ms", default=120.0, show_default=True, help="Optimizer step (GIL free).")
@click.option("--spin-clock", type=click.Choice(["wall", "cpu"]), default="wall",
              show_default=True, help="A model call spins until this clock has advanced.")
@click.option("--launch-us", default=0.0, show_default=True,
              help="The spin releases the GIL every this many us (kernel launches); 0: never.")
@click.option("--opt-spin-ms", default=0.0, show_default=True,
              help="Spin (with --launch-us releases) in the optimizer step before its sleep.")
@click.option("--rounds", default=3, show_default=True)
@click.option("--baseline", default=None, help="Another blocklm checkout, run in alternation.")
@click.option("--set", "extra", multiple=True, help="key=value override of this checkout's runs.")
@click.option("--alt-set", "alt", multiple=True,
              help="key=value: also run this checkout with these overrides (name 'alt') in "
                   "each round, e.g. train.chain_epochs=false.")
@click.option("--admit-micro", is_flag=True,
              help="Only time admission itself per example, each dispatch.admission, in turn.")
@click.option("--one", is_flag=True, hidden=True)  # a single run, JSON on stdout
def bench_turnover(data, steps, warmup, spin_us, opt_ms, spin_clock, launch_us, opt_spin_ms,
                   rounds, baseline, extra, alt, admit_micro, one):
    """Data wait at epoch turnovers vs other steps, host-bound GPU proxy (CPU).

    \b
    Example:
      git worktree add /tmp/base HEAD~3
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_turnover --baseline /tmp/base --rounds 6
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_turnover --spin-clock cpu --rounds 2
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_turnover --alt-set train.chain_epochs=false
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_turnover --spin-clock cpu --launch-us 50 \
          --opt-spin-ms 60 --alt-set dispatch.admission=prefetch
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_turnover --admit-micro
    """
    if admit_micro:
        click.echo(json.dumps({"us_per_example_median": time_admission(data)}))
        return
    if one:
        click.echo(json.dumps(one_run(data, steps, warmup, spin_us, opt_ms, spin_clock, extra,
                                      launch_us, opt_spin_ms)))
        return
    here = str(Path(__file__).resolve().parents[1])
    codes = {"now": (here, extra)}
    if baseline is not None:
        codes = {"baseline": (baseline, ()), **codes}
    if alt:
        codes["alt"] = (here, extra + alt)
    args = [sys.executable, str(Path(__file__).resolve()), "--one", "--data",
            str(Path(data).resolve()), "--steps", str(steps), "--warmup", str(warmup),
            "--spin-us", str(spin_us), "--opt-ms", str(opt_ms), "--spin-clock", spin_clock,
            "--launch-us", str(launch_us), "--opt-spin-ms", str(opt_spin_ms)]
    got: dict[str, list[dict]] = {c: [] for c in codes}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            for name, (root, sets) in codes.items():
                link = Path(tmp) / name / "blocklm"  # the checkout imported as `blocklm`
                link.parent.mkdir(exist_ok=True)
                if not link.exists():
                    link.symlink_to(root)
                load = os.getloadavg()[0]
                out = subprocess.run(args + [f"--set={o}" for o in sets], capture_output=True,
                                     text=True, check=True,
                                     env=dict(os.environ, PYTHONPATH=str(link.parent)))
                res = json.loads(out.stdout.strip().splitlines()[-1])
                res["load"] = round(load, 2)
                got[name].append(res)
                turn, rest = split(res)
                click.echo(f"round {r + 1} {name:<8} load {load:.2f} tokens/s "
                           f"{res.get('tokens_per_s')} ms/step {res['ms_per_step']} batches/step {res.get('batches_per_step')} "
                           f"admit ms {res.get('admit_ms_per_step')} share "
                           f"{res['share_data_wait']:.3f} turnovers {turn} others median "
                           f"{statistics.median(rest)} max {max(rest)} full GCs "
                           f"{[ms for _, ms in res['full_collections_ms']]}")
    for name, runs in got.items():
        turn = [x for r in runs for x in split(r)[0]]
        rest = [x for r in runs for x in split(r)[1]]
        shares = [r["share_data_wait"] for r in runs]
        click.echo(f"{name:<8} tokens/s median "
                   f"{statistics.median(r.get('tokens_per_s', 0) for r in runs)} "
                   f"admit ms/step median "
                   f"{statistics.median(r.get('admit_ms_per_step', 0) for r in runs)} "
                   f"ms/step median "
                   f"{statistics.median(r['ms_per_step'] for r in runs)} "
                   f"share median {statistics.median(shares):.3f} "
                   f"({min(shares):.3f}-{max(shares):.3f}); turnovers median "
                   f"{statistics.median(turn)} ms ({min(turn)}-{max(turn)}); others median "
                   f"{statistics.median(rest)} ms (max {max(rest)})")


if __name__ == "__main__":
    bench_turnover()
