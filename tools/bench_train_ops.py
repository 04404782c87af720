"""CPU proxy of the training step's host cost: ATen ops, bytes copied and cast per optimizer step.

The H200 step is host-bound on mixed data (GPU_NOTES: 17,330 kernels per profiled mixed step) and
spends ~11% of its GPU time in state copies and ~11% in casts. Both scale with what the model
asks the dispatcher to do, which the CPU sees as well: this runs the trainer at a tiny width (so
per-op overhead dominates, as on the GPU's host side) under bf16 autocast with the GPU's row grid,
stack off, and counts every ATen op of the timed optimizer steps (forward and backward) with a
``TorchDispatchMode``: ops, bytes written by data-movement ops (``COPY_OPS``), casts (``_to_copy``
to another dtype) and their bytes. A second pass without the counter times the same steps (host
ms per optimizer step: model calls + backward + optimizer). The batches are fixed by the seed;
``batches`` is a digest of their modes and sizes, so two codes' figures are on the same batches.

Run it against another checkout by putting that checkout first on the path as ``blocklm``
(``PYTHONPATH=/tmp/pkg python -m blocklm.tools.bench_train_ops`` with /tmp/pkg/blocklm a link).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the `small` decoder's shape (12 layers, 4 banks, chunk 64) at a width where op overhead rules
TINY = ["model.decoder.d_model=64", "model.decoder.d_core=32", "model.decoder.d_ff=128",
        "model.decoder.attention.heads=2", "model.decoder.attention.head_dim=16",
        "model.modes.image.head_width=16", "model.modes.audio.head_width=16",
        "model.heads.hidden=32", "model.decoder.stack.enabled=false",
        "model.modes.text.vocab_size=none", "train.device=cpu", "train.log_every=1000",
        "train.checkpoint_every=0", "train.tokens_per_step=16384", "dispatch.budget=16384"]
COPY_OPS = {"cat", "stack", "clone", "copy_", "constant_pad_nd", "slice_backward",
            "select_backward", "index_select", "index", "gather", "index_put_", "index_put",
            "slice_scatter", "select_scatter", "new_zeros", "zeros", "zeros_like", "where",
            "masked_fill", "_unsafe_view", "split_with_sizes_copy", "unbind_copy",
            "narrow_copy", "embedding_dense_backward", "scatter_add_", "repeat"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _site() -> str:
    """The innermost blocklm frame outside this file (file:line function)."""
    import traceback

    for fr in reversed(traceback.extract_stack()):
        if "blocklm" in fr.filename or "/work/" in fr.filename or "/tmp/base" in fr.filename:
            if "bench_train_ops" not in fr.filename:
                return f"{'/'.join(fr.filename.split('/')[-2:])}:{fr.lineno} {fr.name}"
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts ATen ops (by overload packet name), data-movement bytes and casts."""

    def __init__(self, where: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.where = set(where)  # ops to attribute to the blocklm source line that called them
        self.sites: Counter = Counter()
        self.ops: Counter = Counter()
        self.copy_bytes: Counter = Counter()
        self.casts = 0
        self.cast_bytes = 0
        self.phase = "forward"  # forward (model calls), backward, optimizer (clip + AdamW)
        self.phases: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        self.phases[self.phase] += 1
        if name in self.where:
            self.sites[f"{name} {_site()}"] += 1
        res = out[0] if isinstance(out, (tuple, list)) and out else out
        if name == "_to_copy" and isinstance(args[0], torch.Tensor) \
                and isinstance(res, torch.Tensor):
            if res.dtype != args[0].dtype:
                self.casts += 1
                self.cast_bytes += _nbytes(res)
            else:
                self.copy_bytes[name] += _nbytes(res)
        elif name in COPY_OPS:
            self.copy_bytes[name] += sum(_nbytes(t) for t in out) \
                if isinstance(out, (tuple, list)) else _nbytes(out)
        return out


class StandIn(torch.autograd.Function):
    """Stands in for the Triton kernels' autograd function (same arguments and outputs, one
    node): the CPU reference's chunk loop would otherwise be most of the CPU step, where on the
    GPU the attention is a few kernels launched from one node."""

    @staticmethod
    def forward(ctx, q, k, v, r, w, g, S0, z0, eps, C, R):
        B, H, _, D = q.shape
        ctx.save_for_backward(r, w, g)
        ctx.has_s0 = S0 is not None
        S = S0 * 1.0 if S0 is not None else q.new_zeros(B, H, r.shape[-1], D, v.shape[-1],
                                                         dtype=torch.float32)
        z = z0 * 1.0 if z0 is not None else q.new_zeros(B, H, r.shape[-1], D,
                                                        dtype=torch.float32)
        return v * 1, S, z

    @staticmethod
    def backward(ctx, do, dS, dz):
        r, w, g = ctx.saved_tensors
        return (do, do, do, torch.zeros_like(r), torch.zeros_like(w), torch.zeros_like(g),
                dS if ctx.has_s0 else None, dz if ctx.has_s0 else None, None, None, None)


def route_kernels() -> None:
    """Send the CPU through the decoder's kernel path, with :class:`StandIn` as the kernels."""
    from blocklm.model import attention, banked_triton

    banked_triton.BankedAttentionFn = StandIn
    if hasattr(attention, "kernel_path"):
        attention.kernel_path = lambda q, v, chunk: attention.triton_supports(q, v, chunk) \
            or True
    else:  # code from before kernel_path: its _mix's kernel branch, verbatim
        def _mix(self, q, k, v, r, w, g, S, z):
            lp = torch.bfloat16
            return attention.banked_attention_triton(q.to(lp), k.to(lp), v.to(lp), r, w, g, S,
                                                     z, self.cfg.eps, self.cfg.chunk)
        attention.BankedAttention._mix = _mix


def run(data: str, steps: int, warmup: int, count: bool, extra: list[str],
        where: tuple[str, ...] = ()) -> dict:
    """One fresh trainer on ``data``: ``warmup`` steps, then ``steps`` measured ones."""
    from blocklm.tools.train.loop import RunSpec, Trainer

    torch.set_num_threads(1)
    route_kernels()
    with tempfile.TemporaryDirectory() as tmp:
        spec = RunSpec(preset="small", data=[data], overrides=TINY + list(extra))
        tr = Trainer(Path(tmp) / "run", spec, resume=False, remote=None, progress=False,
                     tensorboard=False)
        tr.runners.autocast = True  # bf16 autocast on the CPU: the GPU's casts
        tr.model.decoder.grid_rows = True  # the GPU's padded row grid
        sig = hashlib.sha1()
        st = {"n": 0, "host": 0.0, "counter": None, "batches": 0}
        run_fn, fin_fn, opt_fn = tr.runners.run, tr.runners.finish, tr.optimizer_step

        def measured() -> bool:
            return warmup <= st["n"] < warmup + steps

        def timed(fn):
            def call(*a):
                t = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    if measured():
                        st["host"] += time.perf_counter() - t
            return call

        def phase(p: str) -> None:
            if st["counter"] is not None:
                st["counter"].phase = p

        clip = torch.nn.utils.clip_grad_norm_

        def on_clip(*a, **k):  # the optimizer's part of the step starts here
            phase("optimizer")
            return clip(*a, **k)
        torch.nn.utils.clip_grad_norm_ = on_clip

        def on_run(mode, batch):
            phase("forward")
            if measured():
                st["batches"] += 1
                sig.update(f"{mode}:{len(batch.requests)}:{batch.padded_cost};".encode())
            return run_fn(mode, batch)

        def on_opt():
            phase("backward")
            opt_fn()
            phase("forward")
            st["n"] += 1
            if st["n"] == warmup and count:
                st["counter"] = OpCounter(where)
                st["counter"].__enter__()
            if st["n"] == warmup + steps:
                if st["counter"] is not None:
                    st["counter"].__exit__(None, None, None)
                tr.target = st["n"]

        tr.runners.run = timed(on_run)
        tr.runners.finish = timed(fin_fn)
        tr.optimizer_step = timed(on_opt)
        tr.fit(steps=10**9, minutes=None)
        out = {"data": data, "steps": steps, "batches": st["batches"],
               "batches_digest": sig.hexdigest()[:12],
               "host_ms_per_step": round(st["host"] * 1e3 / steps, 1)}
        c = st["counter"]
        if c is not None:
            out.update({
                "ops_per_step": round(sum(c.ops.values()) / steps),
                "ops_by_phase": {k: round(v / steps) for k, v in c.phases.items()},
                "copy_mb_per_step": round(sum(c.copy_bytes.values()) / steps / 1e6, 3),
                "casts_per_step": round(c.casts / steps),
                "cast_mb_per_step": round(c.cast_bytes / steps / 1e6, 3),
                "top_ops": {k: round(v / steps) for k, v in c.ops.most_common(25)},
                "top_copy_mb": {k: round(v / steps / 1e6, 3)
                                for k, v in c.copy_bytes.most_common(10)}})
            if where:
                out["sites"] = {k: round(v / steps) for k, v in c.sites.most_common(40)}
        return out


@click.command("train-ops")
@click.option("--data", "datas", multiple=True,
              default=["data/shards/text", "data/gpu_mixed4"], show_default=True)
@click.option("--steps", default=2, show_default=True, help="Measured optimizer steps.")
@click.option("--warmup", default=1, show_default=True)
@click.option("--count/--no-count", default=True, show_default=True,
              help="Count ops (a second, uncounted pass always times the same steps).")
@click.option("--set", "extra", multiple=True, help="Extra key=value overrides.")
@click.option("--where", default="", help="Comma-separated ops to attribute to source lines.")
def bench_train_ops(datas, steps, warmup, count, extra, where):
    """ATen ops, bytes copied and cast, host ms per optimizer step (CPU, tiny width).

    \b
    Example:
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_train_ops --steps 2
    """
    for data in datas:
        res = run(data, steps, warmup, False, list(extra))
        if count:
            counted = run(data, steps, warmup, True, list(extra),
                          tuple(w for w in where.split(",") if w))
            res.update({k: v for k, v in counted.items() if k != "host_ms_per_step"},
                       counted_host_ms=counted["host_ms_per_step"])
        click.echo(json.dumps(res))


if __name__ == "__main__":
    bench_train_ops()
