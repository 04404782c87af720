"""What a training run is built from: its spec (``run.json``), device, optimizer, loader and
shape buckets (used by :mod:`.loop`, the benchmarks and the tests)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from blocklm.formats import iter_index
from blocklm.pipeline import BlockDataset, RemoteConfig, RemoteOpener
from blocklm.pipeline.buckets import BucketSpec, estimate_buckets

from .config import RunConfig

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
    fused = all(p.is_cuda for p in decay + rest)  # one kernel per step instead of per tensor
    return torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), fused=fused or None)


def make_source(spec: RunSpec, cfg: RunConfig, remote: RemoteConfig) -> Any:
    t = cfg.train
    sets = [BlockDataset(d, shuffle=True, seed=t.seed, shuffle_buffer=t.shuffle_buffer,
                         remote=remote)
            for d in spec.data]
    if len(sets) == 1:
        return sets[0]
    return BlockDataset.mix(sets, spec.weights or [1.0] * len(sets), seed=t.seed)


def make_buckets(data: Sequence[str], cost, remote: RemoteConfig,
                 max_width: float | None = 0.06) -> BucketSpec:
    """Shape buckets from the datasets' indexes (manifest and indexes only, local or remote);
    ``max_width``: see :func:`estimate_buckets`."""
    opener = RemoteOpener(remote)
    shapes = ((b.mode, tuple(b.shape)) for d in data
              for _, e in iter_index(d, opener=opener) for b in e.blocks)
    return estimate_buckets(shapes, cost, max_width=max_width)
