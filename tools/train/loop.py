"""The training job: loader -> dispatcher -> model, with checkpoints and exact resumption.

Examples stream from :class:`blocklm.pipeline.BlockDataset` through the
:class:`blocklm.pipeline.Dispatcher` into :class:`ModelRunners` (one runner per mode). Loss terms
accumulate until ``tokens_per_step`` decoder steps have run, then one backward pass and one
optimizer step close the window. A checkpoint is taken only at a window boundary and holds the
model, optimizer, scheduler, RNG states, epoch, the dispatcher's state (in-flight examples with
their contexts) and the loader's counters; resuming rebuilds the same batches in the same order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from blocklm.formats import iter_index
from blocklm.model.blocklm import BlockLM
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener
from blocklm.pipeline.buckets import BucketSpec, estimate_buckets
from blocklm.pipeline.cost import cost_from_supports
from blocklm.pipeline.dispatch import Dispatcher

from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import RunConfig, build_config
from .evaluate import evaluate, validation_source
from .metrics import MetricsLog
from .runner import Context, ModelRunners
from .schedule import warmup_cosine

RUN_META = "run.json"


@dataclass
class RunSpec:
    """What identifies a run: preset, overrides and data (saved as ``RUN/run.json``)."""

    preset: str
    data: list[str]
    weights: list[float] | None = None
    overrides: list[str] = field(default_factory=list)
    val: str | None = None  # held-out dataset evaluated every train.eval_every steps
    s3_endpoint: str | None = None  # for s3:// data on S3-compatible storage (credentials:
    # passed to train() as a RemoteConfig, or s3fs's own default chain; never saved here)

    def save(self, run: Path) -> None:
        (run / RUN_META).write_text(json.dumps(self.__dict__, indent=1) + "\n")

    @classmethod
    def load(cls, run: Path) -> RunSpec:
        path = run / RUN_META
        if not path.is_file():
            raise FileNotFoundError(f"{run} holds no run to resume (no {RUN_META})")
        return cls(**json.loads(path.read_text()))


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """AdamW; matrices decay, vectors (biases, norms) and embeddings' scalars do not."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2))


def make_source(spec: RunSpec, cfg: RunConfig, remote: RemoteConfig) -> Any:
    t = cfg.train
    sets = [BlockDataset(d, shuffle=True, seed=t.seed, shuffle_buffer=t.shuffle_buffer,
                         remote=remote)
            for d in spec.data]
    if len(sets) == 1:
        return sets[0]
    return BlockDataset.mix(sets, spec.weights or [1.0] * len(sets), seed=t.seed)


def make_buckets(data: Sequence[str], cost, remote: RemoteConfig) -> BucketSpec:
    """Shape buckets from the datasets' indexes (manifest and indexes only, local or remote)."""
    opener = RemoteOpener(remote)
    shapes = ((b.mode, tuple(b.shape)) for d in data
              for _, e in iter_index(d, opener=opener) for b in e.blocks)
    return estimate_buckets(shapes, cost)


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


def train(run: str | Path, spec: RunSpec | None = None, *, steps: int | None = None,
          minutes: float | None = None, resume: bool = False, progress: bool = True,
          tensorboard: bool = True, remote: RemoteConfig | None = None) -> dict[str, Any]:
    """Train (or resume) the run in folder ``run``; returns a summary of the last window.

    ``remote`` configures http(s)/s3 reads (timeouts, retries, S3 credentials); the run's
    ``s3_endpoint`` fills in its endpoint when it has none. Stops after ``steps`` optimizer steps in total, after ``minutes`` of wall time, or on
    SIGINT/SIGTERM, always with a checkpoint.
    """
    run = Path(run)
    if resume:
        spec = RunSpec.load(run)
    elif spec is None:
        raise ValueError("a new run needs a RunSpec (preset and data)")
    elif (run / "checkpoint.pt").exists():
        raise FileExistsError(f"{run} already holds a run: resume it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    if not resume:
        spec.save(run)
    cfg = build_config(spec.preset, spec.overrides)
    t = cfg.train
    random.seed(t.seed)
    np.random.seed(t.seed)
    torch.manual_seed(t.seed)
    device = pick_device(t.device)
    model = BlockLM(cfg.model).to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_cosine(s, warmup=t.warmup, total=t.schedule_steps,
                                     floor=t.lr_floor))
    remote = remote or RemoteConfig()
    if spec.s3_endpoint and not remote.s3_endpoint_url:
        remote = dataclasses.replace(remote, s3_endpoint_url=spec.s3_endpoint)
    source = make_source(spec, cfg, remote)
    cost = cost_from_supports(dict(model.supports))
    runners = ModelRunners(model, device, autocast=device.type == "cuda" and t.bf16)
    disp_buckets = make_buckets(spec.data, cost, remote)
    disp = Dispatcher({m: runners.runner(m) for m in model.supports}, disp_buckets,
                      cfg.dispatch, cost=cost)
    step, epoch = 0, 0
    if resume:
        ck = load_checkpoint(run, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        set_rng_state(ck["rng"])
        step, epoch = ck["step"], ck["epoch"]
        runners.window.index = ck["window"]
        if ck["dispatcher"] is not None:
            disp.load_state_dict(_unpack_contexts(ck["dispatcher"]))
    log = MetricsLog(run, tensorboard=tensorboard)
    target = steps if steps is not None else math.inf
    deadline = time.monotonic() + 60 * minutes if minutes is not None else math.inf
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=None if steps is None else steps, initial=step, unit="step",
                   disable=None, dynamic_ncols=True)
    acc: dict[str, list[float]] = {}
    tokens_since, t_log = 0, time.monotonic()
    summary: dict[str, Any] = {}

    def checkpoint(mid_epoch: bool) -> None:
        save_checkpoint(run, {
            "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(), "rng": rng_state(), "step": step, "epoch": epoch,
            "window": runners.window.index,
            "dispatcher": _pack_contexts(disp.state_dict()) if mid_epoch else None,
            "loader": {"epoch": epoch, "stats": getattr(source, "stats", None) and
                       source.stats.to_dict()},
        })

    stopped = "steps"
    with StopFlag() as stop:
        while step < target:
            source.set_epoch(epoch)
            finished_epoch = True
            for st in disp.run(source):
                runners.finish([f.state for f in st.finished
                                if f.error is None and isinstance(f.state, Context)])
                if runners.window.tokens < t.tokens_per_step:
                    continue
                w = runners.window
                objective = w.objective()
                if objective is not None:
                    objective.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                runners.next_window()
                step += 1
                tokens_since += w.tokens
                for m, v in w.report().items():
                    acc.setdefault(m, []).append(v)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix({m: f"{v[-1]:.3f}" for m, v in acc.items()})
                if step % t.log_every == 0 or step >= target:
                    now = time.monotonic()
                    summary = {"step": step, "epoch": epoch,
                               "loss": {m: float(np.mean(v)) for m, v in acc.items()},
                               "objective": (float(objective.detach()) if objective is not None
                                             else None),
                               "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                               "tokens_per_s": tokens_since / max(now - t_log, 1e-9),
                               "dispatch": _dispatch_metrics(disp.metrics())}
                    log.log(summary)
                    acc, tokens_since, t_log = {}, 0, now
                if spec.val and t.eval_every and (step % t.eval_every == 0 or step >= target):
                    ev = evaluate(model, validation_source(spec.val, t.seed, remote),
                                  samples=t.eval_samples, config=cfg.dispatch, device=device,
                                  buckets=disp_buckets)
                    log.log({"step": step, "eval_loss": ev["loss"],
                             "eval_mode_accuracy": ev["mode_accuracy"],
                             "eval_shape_accuracy": ev["shape_accuracy"],
                             "eval_heads_bits": ev["heads_bits"], "eval_samples": ev["samples"]})
                done = step >= target or time.monotonic() >= deadline or stop.signal is not None
                if done or (t.checkpoint_every and step % t.checkpoint_every == 0):
                    checkpoint(mid_epoch=True)
                if done:
                    stopped = ("signal" if stop.signal is not None else
                               "steps" if step >= target else "minutes")
                    finished_epoch = False
                    break
            if not finished_epoch:
                break
            epoch += 1
    if bar is not None:
        bar.close()
    log.close()
    summary = dict(summary, stopped=stopped, step=step)
    (run / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary


def load_model(run: str | Path, device: str = "cpu") -> tuple[BlockLM, RunConfig, RunSpec]:
    """The model of a run's latest checkpoint, with its config and spec."""
    run = Path(run)
    spec = RunSpec.load(run)
    cfg = build_config(spec.preset, spec.overrides)
    model = BlockLM(cfg.model)
    model.load_state_dict(load_checkpoint(run, map_location=device)["model"])
    return model.to(device).eval(), cfg, spec


def _dispatch_metrics(m: dict[str, Any]) -> dict[str, Any]:
    """The dispatcher's metrics worth a line in every record."""
    keep = ("padding_ratio", "batch_fill", "tokens_per_batch_mean", "queue_age_p99",
            "ttl_forced", "batches")
    return {"examples_in_flight": m.get("examples_in_flight"), "rejected": m.get("rejected"),
            "modes": {k: {f: v.get(f) for f in keep if f in v}
                      for k, v in m.get("modes", {}).items()}}
