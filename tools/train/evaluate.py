"""Held-out evaluation: bits per element per mode, next-mode and shape accuracy."""

from __future__ import annotations

import itertools
from typing import Any

import torch

from blocklm.model.blocklm import BlockLM
from blocklm.pipeline import BlockDataset, RemoteConfig
from blocklm.pipeline.cost import cost_from_supports
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig

from .runner import Context, ModelRunners


@torch.no_grad()
def evaluate(model: BlockLM, source: Any, *, samples: int, config: DispatchConfig,
             device: torch.device, buckets=None) -> dict[str, Any]:
    """Run the first ``samples`` examples of ``source`` through the dispatcher without gradients.

    Returns ``{"loss": {mode: bits per element}, "heads_bits": mean bits per next-mode/shape/end
    prediction, "mode_accuracy", "mode_accuracy_later", "shape_accuracy", "samples"}``. Next-mode
    accuracy counts the argmax of the next-mode head (including end-of-example) against the truth;
    ``mode_accuracy_later`` counts only the predictions made after an example's first block (the
    later blocks' modes and the end: on the mixed pairs, fully determined by the history); shape
    accuracy counts blocks whose most likely shape bins (log-spaced per dimension, greedy) are all
    right.
    """
    was_training = model.training
    model.eval()
    runners = ModelRunners(model, device, train=False, measure=True)
    cost = cost_from_supports(dict(model.supports))
    disp = Dispatcher({m: runners.runner(m) for m in model.supports}, buckets, config, cost=cost)
    n = 0
    for st in disp.run(itertools.islice(iter(source), samples)):
        runners.finish([f.state for f in st.finished
                        if f.error is None and isinstance(f.state, Context)])
        n += len(st.finished)
    model.train(was_training)
    w = runners.window
    heads = w.heads_report()
    return {"loss": w.report(), "heads_bits": heads, "samples": n,
            "mode_accuracy": w.mode_correct / max(w.mode_total, 1),
            "mode_accuracy_later": w.later_correct / max(w.later_total, 1),
            "shape_accuracy": w.shape_correct / max(w.shape_total, 1)}


def validation_source(path: str, seed: int, remote: RemoteConfig | None = None,
                      shuffle: bool = False) -> BlockDataset:
    """A held-out dataset, the same samples in the same order at every evaluation: in file order,
    or with ``shuffle`` in one fixed seeded order (epoch 0), so that the first N samples mix the
    dataset's sources even when its files hold them in runs (``mixed-val`` starts with ~200
    audio/image examples: an in-order 200-sample evaluation never sees a text+text pair)."""
    return BlockDataset(path, shuffle=shuffle, seed=seed, remote=remote)
