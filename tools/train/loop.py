"""The training job: loader -> dispatcher -> model, with checkpoints and exact resumption.

Examples stream from :class:`blocklm.pipeline.BlockDataset` through the
:class:`blocklm.pipeline.Dispatcher` into :class:`ModelRunners` (one runner per mode). Loss terms
accumulate until ``tokens_per_step`` decoder steps have run (or the batches hold
``train.window_max_state_gib`` of recurrent state), then one backward pass and one optimizer
step close the window. A checkpoint is taken only at a window boundary and holds the
model, optimizer, scheduler, RNG states, epoch, the dispatcher's state (in-flight examples with
their contexts) and the loader's counters; resuming rebuilds the same batches in the same order.

By default each epoch is its own dispatcher run, drained, with a partial optimizer step at its
end; the next epoch is read, prepared and planned for admission ahead (:mod:`.readahead`). With
``train.chain_epochs=true`` epochs are chained (:mod:`.chain`): ONE dispatcher run over epoch
after epoch (each reshuffled by the loader's ``set_epoch``), the next epoch's examples admitted as
in-flight places free up, so no epoch ends in a string of small drain batches and an optimizer
step's window may hold samples of two epochs. ``self.epoch`` is then the epoch of the newest
sample admitted (logged as ``epoch``); the checkpoint also records where each epoch still in
flight starts, so a resumed run rebuilds the chain from the oldest one and forms exactly the
uninterrupted run's batches. Chained, the read-ahead is the dispatcher's own prefetch thread,
which reads on across the epoch boundary (released at optimizer steps: ``EpochChain.gate``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import record_function

from blocklm.model.blocklm import BlockLM
from blocklm.pipeline import RemoteConfig
from blocklm.pipeline.cost import cost_from_supports
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_admit import plan_admission
from blocklm.pipeline.dispatch_dist import torch_agree

from .batching import check_batching, window_record
from .chain import EpochChain, training_dispatch
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, build_config
from .cuda_alloc import apply_alloc_settings
from .distributed import Collective, init_from_launcher, leave_launcher_group
from .evaluate import evaluate, validation_source
from .loop_util import (
    FULL_GC_EVERY,  # noqa: F401  (re-exported)
    GCFreeze,
    HostThreads,
    StopFlag,
    _dispatch_metrics,
    _loader_stats,
    _pack_contexts,
    _unpack_contexts,
    host_threads,
    out_of_memory,
    stop_reason,
    window_full,
    window_limited,
    window_rooms,
)
from .metrics import MetricsLog
from .readahead import EpochReadAhead
from .runner import HEADS, Context, ModelRunners
from .schedule import warmup_cosine
from .spec import RUN_META, RunSpec, make_buckets, make_optimizer, make_source, pick_device
from .step_log import Figures, StepLog, StepRecord

__all__ = ["RUN_META", "RunSpec", "Trainer", "load_model", "make_buckets", "make_optimizer",
           "make_source", "pick_device", "train"]


def train(run: str | Path, spec: RunSpec | None = None, *, steps: int | None = None,
          minutes: float | None = None, resume: bool = False, progress: bool = True,
          tensorboard: bool = True, remote: RemoteConfig | None = None) -> dict[str, Any]:
    """Train (or resume) the run in folder ``run``; returns a summary of the last logged step.

    ``remote`` configures http(s)/s3 reads (timeouts, retries, S3 credentials); the run's
    ``s3_endpoint`` fills in its endpoint when it has none. Stops after ``steps`` optimizer steps
    in total, after ``minutes`` of wall time, or on SIGINT/SIGTERM, always with a checkpoint.
    Under ``torchrun`` every rank trains on its share of the data (see :mod:`.distributed`).
    """
    try:
        out = Trainer(Path(run), spec, resume=resume, remote=remote, progress=progress,
                      tensorboard=tensorboard).fit(steps=steps, minutes=minutes)
    except BaseException:
        leave_launcher_group(wait=False)  # the other ranks may be gone: no barrier
        raise
    leave_launcher_group()
    return out


class Trainer:
    """One training run: builds everything from the run's spec, then :meth:`fit`."""

    def __init__(self, run: Path, spec: RunSpec | None, *, resume: bool,
                 remote: RemoteConfig | None, progress: bool, tensorboard: bool) -> None:
        init_from_launcher()
        self.coll = Collective()
        if resume:
            spec = RunSpec.load(run)
        elif spec is None:
            raise ValueError("a new run needs a RunSpec (preset and data)")
        elif (run / "checkpoint.pt").exists():
            raise FileExistsError(f"{run} already holds a run: resume it or choose another --out")
        self.run, self.spec = run, spec
        if self.coll.rank == 0:
            run.mkdir(parents=True, exist_ok=True)
            if not resume:
                spec.save(run)
        if self.coll.world > 1:
            torch.distributed.barrier()  # the run folder exists before any rank writes to it
        self.cfg = cfg = build_config(spec.preset, spec.overrides)
        t = self.t = cfg.train
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        self.device = pick_device(t.device)
        apply_alloc_settings(t.cuda_alloc, self.device)  # before the model's first allocation
        self.model = BlockLM(cfg.model).to(self.device)
        self.opt = make_optimizer(self.model, cfg)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: warmup_cosine(s, warmup=t.warmup, total=t.schedule_steps,
                                              floor=t.lr_floor))
        remote = remote or RemoteConfig()
        if spec.s3_endpoint and not remote.s3_endpoint_url:
            remote = dataclasses.replace(remote, s3_endpoint_url=spec.s3_endpoint)
        self.remote = remote
        self.source = make_source(spec, cfg, remote)
        self.ahead = EpochReadAhead(self.source, cfg.dispatch.max_in_flight, auto=False)
        cost = cost_from_supports(dict(self.model.supports))
        self.modes = sorted(self.model.supports)
        # built under the fit's CPU threads: on CUDA the runners compile the heads' graphs now,
        # and a compiled graph guards on torch's thread count (built under another number, each
        # was compiled again at the fit's first batch: ~5 s each on the H200, GPU_NOTES P67)
        with HostThreads(host_threads(t.host_threads, self.device.type)):
            self.runners = ModelRunners(self.model, self.device,
                                        autocast=self.device.type == "cuda" and t.bf16,
                                        cost_from_content=t.cost_from_content)
        self.buckets = make_buckets(spec.data, cost, remote, t.bucket_max_width)
        agree = torch_agree() if self.coll.world > 1 else None
        self.disp = Dispatcher({m: self.runners.runner(m) for m in self.modes}, self.buckets,
                               training_dispatch(cfg), cost=cost, agree=agree,
                               rank=self.coll.rank, prepare=self.runners.prepare)
        if not t.chain_epochs:  # chained, the dispatcher's own read-ahead crosses epochs
            self.ahead.prepare = self.disp._prepare  # the next epoch is decoded ahead too:
            self.disp._prepare = self.ahead.cached(self.ahead.prepare)  # the dispatcher takes it
            self.ahead.plan = partial(plan_admission, self.disp)  # and its admission built ahead
        # the epoch of the newest sample admitted (chained, older epochs may still be in flight)
        self.step = self.epoch = 0
        self.chain: EpochChain | None = None  # the run's chained source (train.chain_epochs)
        self._chain_from: tuple[int, int, dict[int, int]] = (0, 0, {})  # its first epoch, start
        if resume:
            self._restore()
        self.log = MetricsLog(run, tensorboard=tensorboard) if self.coll.rank == 0 else None
        self.progress = progress and self.coll.rank == 0
        # one process only: with several, each step's bit sums are summed over the ranks then
        self.async_log = (t.async_log if t.async_log is not None
                          else self.device.type == "cuda") and self.coll.world == 1
        self.steplog = StepLog(self.modes, self.coll, self.log, lag=self.async_log)

    # -- checkpoints ---------------------------------------------------------------------------
    def _rank_file(self) -> Path:
        return self.run / f"rank-{self.coll.rank}.pt"

    def checkpoint(self) -> None:
        """Model, optimizer, scheduler (rank 0) and each rank's dispatcher, loader and RNG."""
        self.steplog.flush()  # the log holds every step the checkpoint holds
        state = self.disp.state_dict()
        mine = {"step": self.step, "world": self.coll.world, "rng": rng_state(),
                "dispatcher": _pack_contexts(state),
                "loader": {"epoch": self.epoch, "stats": _loader_stats(self.source),
                           "windows": window_record(self.t)}}
        if self.chain is not None:  # where each epoch still needed starts (chain.py)
            mine["loader"]["chain"] = self.chain.state(Dispatcher.resume_position(state),
                                                       state["drawn"])
        if self.coll.world > 1:
            torch.save(mine, self._rank_file().with_suffix(".tmp"))
            os.replace(self._rank_file().with_suffix(".tmp"), self._rank_file())
            torch.distributed.barrier()
        if self.coll.rank == 0:
            save_checkpoint(self.run, {
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "step": self.step, "epoch": self.epoch,
                "window": self.runners.window.index, **({} if self.coll.world > 1 else mine)})
        if self.coll.world > 1:
            torch.distributed.barrier()

    def _restore(self) -> None:
        ck = load_checkpoint(self.run, map_location=self.device)
        mine = ck
        if self.coll.world > 1:
            mine = torch.load(self._rank_file(), map_location=self.device, weights_only=True)
            if mine["step"] != ck["step"] or mine["world"] != self.coll.world:
                raise ValueError(f"{self._rank_file()} is from step {mine['step']} on "
                                 f"{mine['world']} ranks; the checkpoint is from step "
                                 f"{ck['step']}, and this run has {self.coll.world} ranks")
        elif ck.get("world", 1) != 1:
            raise ValueError(f"the checkpoint was written by {ck['world']} ranks: resume it "
                             "with torchrun and as many processes")
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        set_rng_state(mine["rng"])
        self.step, self.epoch = ck["step"], ck["epoch"]
        chain = mine.get("loader", {}).get("chain")
        if self.t.chain_epochs:  # each rank's own epochs (their lengths may differ)
            if chain is None and self.disp.config != self.cfg.dispatch:
                raise ValueError(f"{self.run}: the checkpoint is of per-epoch runs: resume it "
                                 "with train.chain_epochs=false, or chained with "
                                 "train.chain_batch_samples=none (its batches had no such cap)")
            self.epoch = mine.get("loader", {}).get("epoch", self.epoch)
            self._chain_from = EpochChain.resume_args(chain, self.epoch)
        elif chain is not None:
            raise ValueError(f"{self.run}: the checkpoint was written with chained epochs "
                             f"(train.chain_epochs=true; epochs {[e for e, _ in chain]} in "
                             f"flight): resume it with train.chain_epochs=true")
        check_batching(self.run, mine.get("loader", {}).get("windows"),
                       mine["dispatcher"]["config"], self.disp, self.t, self.spec.overrides)
        self.runners.window.index = ck["window"]
        self.disp.load_state_dict(_unpack_contexts(mine["dispatcher"]))

    # -- steps ---------------------------------------------------------------------------------
    def optimizer_step(self) -> None:
        """Back-propagate the window (global normalisers), sum gradients, step; the step's log
        record is written once its figures reach the host (:mod:`.step_log`)."""
        w = self.runners.window
        self.runners.close_autocast()
        counts = self.coll.sum(w.counts(self.modes) + [float(w.tokens)])  # host numbers
        nm = len(self.modes)
        objective = w.objective(dict(zip(self.modes, counts)), dict(zip(HEADS, counts[nm:])))
        if objective is not None:
            with record_function("blocklm:backward"):
                objective.backward()
        with record_function("blocklm:window_sums"):
            bits = w.bit_sums_tensor(self.modes)  # queued: read with the record (step_log)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.coll.sum_gradients(params)
        with record_function("blocklm:clip_adamw"):
            grad_norm = torch.nn.utils.clip_grad_norm_(params, self.t.grad_clip)
            self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.runners.next_window()
        self.step += 1
        if bits is None:  # no bits in the window: zeros, as bit_sums gives
            bits = grad_norm.new_zeros(nm + len(HEADS), dtype=torch.float64)
        log = self.step % self.t.log_every == 0 or self.step >= self.target
        rec = StepRecord(self.step, self.epoch, counts,
                         Figures(torch.cat([bits, grad_norm.detach().reshape(1).double()])),
                         self.sched.get_last_lr()[0], time.monotonic(), log,
                         _dispatch_metrics(self.disp.metrics()) if log else None)
        self.steplog.push(rec)
        spec, t = self.spec, self.t
        if spec.val and t.eval_every and (self.step % t.eval_every == 0
                                          or self.step >= self.target) and self.coll.rank == 0:
            self.steplog.flush()  # the step's record first, then the evaluation's
            ev = evaluate(self.model, validation_source(spec.val, t.seed, self.remote, shuffle=True),
                          samples=t.eval_samples, config=self.cfg.dispatch, device=self.device,
                          buckets=self.buckets)
            self.log.log({"step": self.step, "eval_loss": ev["loss"],
                          "eval_mode_accuracy": ev["mode_accuracy"],
                          "eval_mode_accuracy_later": ev["mode_accuracy_later"],
                          "eval_shape_accuracy": ev["shape_accuracy"],
                          "eval_heads_bits": ev["heads_bits"], "eval_samples": ev["samples"]})

    @property
    def summary(self) -> dict[str, Any]:
        """The last metrics record written."""
        return self.steplog.summary

    def fit(self, *, steps: int | None, minutes: float | None) -> dict[str, Any]:
        """Train until ``steps`` optimizer steps in all, ``minutes`` or a signal (see
        :func:`train`), with the garbage collector tuned for it (:class:`.loop_util.GCFreeze`)
        and torch's CPU threads set by ``train.host_threads`` (:class:`.loop_util.HostThreads`)."""
        # the indexes first, so that they are frozen with the rest (BlockDataset.load_indexes)
        getattr(self.source, "load_indexes", lambda: 0)()
        with HostThreads(host_threads(self.t.host_threads, self.device.type)), \
                GCFreeze(self.t.full_gc_every):
            try:
                return self._fit(steps, minutes)
            except torch.OutOfMemoryError as e:
                raise out_of_memory(e, self.run, self.step, self.runners.window, self.t,
                                    self.device, self.coll.world) from e

    def _fit(self, steps: int | None, minutes: float | None) -> dict[str, Any]:
        self.target = steps if steps is not None else math.inf
        deadline = time.monotonic() + 60 * minutes if minutes is not None else math.inf
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps, initial=self.step, unit="step", disable=None,
                       dynamic_ncols=True)
        self.steplog.bar = bar
        stopped = "steps"
        with StopFlag() as stop:
            while self.step < self.target:
                ended = self._dispatch(deadline, stop)
                if ended is not None:
                    stopped = ended
                    break
                self.epoch += 1
        self.steplog.flush()
        self.steplog.bar = None
        self.ahead.close()
        if bar is not None:
            bar.close()
        if self.log is not None:
            self.log.close()
        summary = dict(self.summary, stopped=stopped, step=self.step)
        if self.coll.rank == 0:
            (self.run / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary

    def _dispatch(self, deadline: float, stop: StopFlag) -> str | None:
        """One dispatcher run (chained: the whole fit; else one epoch, its partial window
        stepped at its end); why training stops, or None when the epoch ended."""
        src, offset, prefetch = self._source()
        run = self.disp.run(src, offset=offset, prefetch=prefetch)
        try:
            room, mode_rooms = window_rooms(self.t)  # the window's room for batches
            for st in window_limited(run, self.disp, room, lambda: self.runners.window.tokens,
                                     mode_rooms):
                self.runners.finish([f.state for f in st.finished
                                     if f.error is None and isinstance(f.state, Context)])
                if st.batch is None:  # a rank-local tail step: no collectives here
                    continue
                if not window_full(self.runners.window, self.t, self.coll):
                    continue
                if self.chain is not None:  # the next samples are read during backward
                    self.epoch = self.chain.epoch_of(self.disp.drawn - 1)
                    self.chain.release(self.disp.drawn + self.cfg.dispatch.prefetch)
                else:  # the next epoch is read ahead from an optimizer step on, not while
                    # this epoch's examples are admitted (readahead.py); a no-op once started
                    self.ahead.start_next()
                ended = self._after_step(deadline, stop)
                if ended is not None:
                    return ended
            if self.coll.sum([float(self.runners.window.tokens)])[0] > 0:
                self.ahead.start_next()
                return self._after_step(deadline, stop)  # the epoch's partial window
            return None
        finally:
            if self.chain is not None:
                self.chain.release()  # its reader must not wait for a step that never comes
            run.close()

    def _source(self) -> tuple[Any, int, int | None]:
        """The next dispatcher run's (source, offset, prefetch): chained, every epoch from
        ``self.epoch`` on (one run for the whole fit); else this epoch's samples."""
        if self.t.chain_epochs:
            first, start, expect = self._chain_from
            self.chain = EpochChain(self.source, first, start, expect=expect,
                                    name=f"{', '.join(self.spec.data)} (rank {self.coll.rank})")
            c = self.cfg.dispatch
            if c.prefetch > 0:  # read in the prefetch thread: at optimizer steps (chain.py);
                # it may hold samples it pulled but cannot hand over yet (a chunk not full, the
                # decoders' window): the gate holds only with more than those ahead (deadlock)
                stuck = min(c.prefetch_chunk, c.prefetch) + (c.prefetch if c.decode_workers > 1
                                                             else 0)
                self.chain.gate(lambda: self.disp.drawn, max(c.prefetch // 2, stuck + 1))
            return self.chain, start, None
        # the next epoch's first samples are read while this one drains; an epoch read ahead
        # whole is admitted from memory in this thread: through the prefetch thread, hand-offs
        # were a third of its admission (7,222 examples); planned ahead (dispatch_admit.py),
        # all at once in a few ms
        plan = self.ahead.take_whole(self.epoch)
        prefetch = 0 if plan is not None or self.ahead.whole(self.epoch) else None
        return (plan if plan is not None else self.ahead.epoch(self.epoch)), 0, prefetch

    def _after_step(self, deadline: float, stop: StopFlag) -> str | None:
        """Optimizer step, then checkpoint when due or when stopping; returns why it stops."""
        self.optimizer_step()
        ended = self._check_stop(deadline, stop)
        if ended is not None or (self.t.checkpoint_every
                                 and self.step % self.t.checkpoint_every == 0):
            self.checkpoint()
        return ended

    def _check_stop(self, deadline: float, stop: StopFlag) -> str | None:
        """Why to stop now, agreed by every rank (None: go on)."""
        return stop_reason(self.coll, self.step >= self.target, deadline, stop)


def load_model(run: str | Path, device: str = "cpu") -> tuple[BlockLM, RunConfig, RunSpec]:
    """The model of a run's latest checkpoint, with its config and spec."""
    run = Path(run)
    spec = RunSpec.load(run)
    cfg = build_config(spec.preset, spec.overrides)
    model = BlockLM(cfg.model)
    model.load_state_dict(load_checkpoint(run, map_location=device)["model"])
    return model.to(device).eval(), cfg, spec
