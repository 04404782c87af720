"""Learning-rate schedule: linear warm-up, then cosine decay to a floor."""

from __future__ import annotations

import math


def warmup_cosine(step: int, *, warmup: int, total: int, floor: float = 0.1) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based).

    Rises linearly from 1/warmup to 1 over ``warmup`` steps, then follows a cosine from 1 down to
    ``floor`` at ``total`` steps, and stays at ``floor`` after.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / (total - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
