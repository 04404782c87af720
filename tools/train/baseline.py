"""Unigram baselines: what a model that ignores all context scores, in the model's own units.

For each mode the targets are produced by the mode support exactly as in training (text tokens,
image sub-pixels, mu-law audio samples), a unigram distribution over the mode's vocabulary is fit
on training data (add-one smoothing), and its cross-entropy is reported on held-out data in bits
per element (per character, sub-pixel or audio sample), the unit of the model's loss.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch

from blocklm.model.blocklm import BlockLM


def unigram_counts(model: BlockLM, samples: Iterable[Any], limit: int | None = None
                   ) -> dict[str, tuple[torch.Tensor, float]]:
    """Per mode: counts of each target value [vocab] and the number of elements reported."""
    out: dict[str, tuple[torch.Tensor, float]] = {}
    for s in itertools.islice(samples, limit):
        for b in s.blocks:
            if b.mode not in model.supports:
                continue
            sup = model.support(b.mode)
            batch = sup.target([b.decode()], torch.device("cpu"))
            values = batch.targets[batch.mask].reshape(-1)
            counts, elems = out.get(b.mode, (torch.zeros(sup.vocab, dtype=torch.float64), 0.0))
            counts += torch.bincount(values, minlength=sup.vocab)[:sup.vocab].double()
            out[b.mode] = (counts, elems + float(batch.elements.sum()))
    return out


def unigram_bits(train: dict[str, tuple[torch.Tensor, float]],
                 held_out: dict[str, tuple[torch.Tensor, float]]) -> dict[str, float]:
    """Held-out cross-entropy of the add-one-smoothed training unigram, in bits per element."""
    out = {}
    for mode, (counts, elems) in held_out.items():
        fit = train.get(mode, (torch.zeros_like(counts), 0.0))[0] + 1.0
        logp = torch.log(fit / fit.sum())
        out[mode] = float(-(counts * logp).sum() / math.log(2.0) / max(elems, 1.0))
    return dict(sorted(out.items()))
