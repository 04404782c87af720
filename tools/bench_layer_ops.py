"""CPU count of the data movement in one `small` text batch, forward + backward, per source line.

The H200 profile of a `small` text step (device call D4) had ~45 ms of its 325 ms in copies and
casts (``direct_copy``, ``bfloat16_copy``, strided ``nocast`` elementwise kernels, DtoD
memcpys). This builds `small` (text vocabulary from the tokenizer), runs one text batch of
``--batch`` examples forward and backward on the CPU under bf16 autocast, through the kernels'
code path (the kernels replaced by bench_train_ops' stand-in, whose own ops are not counted), and
logs every ATen op with its dtypes, output bytes and the model line that issued it (backward
ops: the line that made their autograd node, from anomaly mode's forward tracebacks). It prints
totals: ops, an estimate of the CUDA kernels outside matrix products (a pad or a slice's
backward is a fill and a copy there), data-movement ops (copies, casts, pads, fills) and the
bytes they write per token; ``--sites N``: the N data-movement sites writing most.

Against another checkout (one without this file too): ``PYTHONPATH=/tmp/pkg python
tools/bench_layer_ops.py`` with /tmp/pkg/blocklm a link to it: this file, that model. Run from
this repository's root (the tokenizer is data/shards/tokenizer.model).
"""

from __future__ import annotations

import json
import random
import traceback
from collections import Counter

import click
import torch
from torch.utils._python_dispatch import TorchDispatchMode

VIEWS = {"detach", "view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice",
         "select", "split", "split_with_sizes", "unsqueeze", "squeeze", "as_strided", "alias",
         "unbind", "lift_fresh", "_reshape_alias", "unfold", "empty", "empty_strided",
         "new_empty", "new_empty_strided", "is_same_size", "scalar_tensor",
         "_has_compatible_shallow_copy_type", "result_type", "set_", "narrow"}
MOVES = {"_to_copy", "copy_", "clone", "cat", "stack", "constant_pad_nd", "slice_backward",
         "select_backward", "index", "index_put_", "split_with_sizes_copy", "repeat", "where",
         "masked_fill", "fill_", "zero_", "zeros", "zeros_like", "new_zeros", "narrow_copy"}
MATMULS = {"mm", "addmm", "bmm", "matmul", "linear"}
TWO_KERNELS = {"constant_pad_nd", "slice_backward", "select_backward"}  # fill + copy on CUDA
_QUIET = [False]  # inside the kernels' stand-in


def _where(backward: bool) -> str:
    """file:line of the model code that issued the current op (or made its autograd node)."""
    if backward:
        node = torch._C._current_autograd_node()
        tb = node.metadata.get("traceback_", "") if node is not None else ""
        lines = [ln for ln in ("".join(tb) if isinstance(tb, list) else tb).splitlines()
                 if "File" in ln and "/model/" in ln and "banked_" not in ln]
        if not lines:
            return "bwd:?"
        ln = lines[-1]
        return f"bwd:{ln.split(chr(34))[1].split('/')[-1]}:{ln.split('line ')[1].split(',')[0]}"
    for fr in reversed(traceback.extract_stack()):
        if "/model/" in fr.filename and "banked_" not in fr.filename:
            return f"{fr.filename.split('/')[-1]}:{fr.lineno}"
    return "?"


class OpLog(TorchDispatchMode):
    """Logs (op, where, output dtype, output bytes, backward) of every non-view ATen op."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple] = []
        self.backward = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if _QUIET[0] or name in VIEWS:
            return out
        outs = out if isinstance(out, (tuple, list)) else [out]
        nbytes = sum(t.numel() * t.element_size() for t in outs if isinstance(t, torch.Tensor))
        src = next((a for a in args if isinstance(a, torch.Tensor)), None)
        cast = name == "_to_copy" and src is not None and outs[0].dtype != src.dtype
        self.rows.append((name, _where(self.backward), cast, nbytes, self.backward))
        return out


def _quiet_kernels() -> None:
    """bench_train_ops' stand-in for the kernels, its own ops left out of the log."""
    from blocklm.model import banked_triton
    from blocklm.tools.bench_train_ops import StandIn, route_kernels

    route_kernels()

    class Quiet(StandIn):
        @staticmethod
        def forward(ctx, *a):
            ctx.set_materialize_grads(False)  # as the kernels' function: no zero-filled dS, dz
            _QUIET[0] = True
            try:
                return StandIn.forward(ctx, *a)
            finally:
                _QUIET[0] = False

        @staticmethod
        def backward(ctx, *g):
            _QUIET[0] = True
            try:
                return StandIn.backward(ctx, *g)
            finally:
                _QUIET[0] = False
    banked_triton.BankedAttentionFn = Quiet


def run(batch: int, words: tuple[int, int], stack: bool, seed: int, sites: int,
        state_out: bool = False, tokenizer: str = "data/shards/tokenizer.model") -> dict:
    """One `small` text batch forward + backward under the log; the totals (and top sites).
    ``tokenizer``: the sentencepiece model of the text vocabulary."""
    from blocklm.model.blocklm import BlockLM
    from blocklm.model.presets import small

    torch.manual_seed(seed)
    rng = random.Random(seed)
    torch.set_num_threads(1)
    _quiet_kernels()
    cfg = small(tokenizer_path=tokenizer, vocab_size=None)
    cfg.decoder.stack.enabled = stack
    model = BlockLM(cfg)
    model.decoder.grid_rows = True  # the GPU's padded row grid
    vocab = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex".split()
    contents = [" ".join(rng.choice(vocab) for _ in range(rng.randint(*words)))
                for _ in range(batch)]
    log = OpLog()
    torch.autograd.set_detect_anomaly(True, check_nan=False)
    try:
        with log:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                res = model.run_block("text", contents, None, targets=True, logits=False,
                                      state_out=state_out)
                loss = res.loss.bits.sum() + res.loss.mode_bits.sum() + res.loss.shape_bits.sum()
            log.backward = True
            loss.backward()
    finally:
        torch.autograd.set_detect_anomaly(False)
    tokens = int(model.support("text").target(contents, None).steps.sum())
    out: dict = {"tokens": tokens, "ops": len(log.rows)}
    for phase, bwd in (("forward", False), ("backward", True)):
        rows = [r for r in log.rows if r[4] == bwd]
        moves = [r for r in rows if r[0] in MOVES]
        out[phase] = {
            "ops": len(rows),
            "est_cuda_kernels_not_matmul": sum(2 if r[0] in TWO_KERNELS else 1
                                               for r in rows if r[0] not in MATMULS),
            "moves": len(moves), "casts": sum(r[2] for r in rows),
            "move_kb_per_token": round(sum(r[3] for r in moves) / tokens / 1e3, 1)}
    if sites:
        by: Counter = Counter()
        for r in log.rows:
            if r[0] in MOVES:
                by[f"{r[0]}{' (cast)' if r[2] else ''} {r[1]}"] += r[3]
        out["sites_kb_per_token"] = {k: round(v / tokens / 1e3, 1)
                                     for k, v in by.most_common(sites)}
    return out


@click.command("layer-ops")
@click.option("--batch", default=40, show_default=True, help="Text blocks in the batch.")
@click.option("--words", nargs=2, type=int, default=(20, 40), show_default=True,
              help="Words per block, at least and at most.")
@click.option("--stack/--no-stack", default=False, show_default=True,
              help="The processing stack on (its CPU loop: slow, and not the GPU's path).")
@click.option("--seed", default=0, show_default=True)
@click.option("--sites", default=0, show_default=True, help="Top data-movement sites to list.")
@click.option("--state-out/--no-state-out", default=False, show_default=True,
              help="Pack the state after the block (the trainer does when an example goes on).")
def bench_layer_ops(batch, words, stack, seed, sites, state_out):
    """Data movement of one `small` text batch, forward + backward, on the CPU (bf16 autocast).

    \b
    Example:
      OMP_NUM_THREADS=1 python -m blocklm.tools.bench_layer_ops --batch 40 --sites 20
    """
    click.echo(json.dumps(run(batch, tuple(words), stack, seed, sites, state_out)))


if __name__ == "__main__":
    bench_layer_ops()
