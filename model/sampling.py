"""Drawing from categorical distributions: temperature, top-k, top-p and adaptive temperature.

Adaptive temperature is the ad-hoc algorithm of "softmax is not enough (for sharp
out-of-distribution)" (Velickovic et al. 2024), as quoted in design note 001::

    p = softmax(logits); H = -sum p log(p + 1e-9)
    beta = max(polyval([-0.037, 0.481, -2.3, 4.917, -1.791], H), 1) if H > 0.5 else 1
    return softmax(logits * beta)

``beta = 1 / theta`` never raises the entropy and leaves low-entropy distributions alone.
Order of operations when sampling: adaptive sharpening, then temperature, then top-k, then top-p.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import SampleConfig

POLY_FIT = (-0.037, 0.481, -2.3, 4.917, -1.791)  # highest power first, as numpy.polyval


def polyval(coeffs: tuple[float, ...], x: Tensor) -> Tensor:
    """Horner evaluation of a polynomial given highest power first (numpy.polyval order)."""
    out = torch.zeros_like(x)
    for c in coeffs:
        out = out * x + c
    return out


def adaptive_beta(logits: Tensor) -> Tensor:
    """Inverse temperature per distribution. logits [..., V] -> beta [..., 1]."""
    p = logits.float().softmax(-1)
    entropy = -(p * torch.log(p + 1e-9)).sum(-1, keepdim=True)
    fit = torch.clamp(polyval(POLY_FIT, entropy), min=1.0)
    return torch.where(entropy > 0.5, fit, torch.ones_like(entropy))


def adaptive_temperature_softmax(logits: Tensor) -> Tensor:
    """Probabilities with adaptive temperature. [..., V] -> [..., V]."""
    return (logits.float() * adaptive_beta(logits)).softmax(-1)


def filter_logits(logits: Tensor, cfg: SampleConfig) -> Tensor:
    """Apply adaptive temperature, temperature, top-k and top-p. [..., V] -> [..., V] (fp32)."""
    x = logits.float()
    if cfg.adaptive:
        x = x * adaptive_beta(x)
    if cfg.temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {cfg.temperature} (use top_k=1 for greedy)")
    x = x / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = x.topk(cfg.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sx, idx = x.sort(-1, descending=True)
        cum = sx.softmax(-1).cumsum(-1)
        drop = cum - sx.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        x = x.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return x


def sample_logits(logits: Tensor, cfg: SampleConfig, generator: torch.Generator | None
                  ) -> Tensor:
    """Draw one index per distribution. logits [..., V] -> [...] long."""
    probs = filter_logits(logits, cfg).softmax(-1)
    flat = probs.reshape(-1, probs.shape[-1])
    draw = torch.multinomial(flat, 1, generator=generator)
    return draw.view(probs.shape[:-1])
