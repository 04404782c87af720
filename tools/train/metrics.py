"""Run metrics: one JSON object per logged step in ``RUN/metrics.jsonl``, mirrored to
TensorBoard event files in ``RUN/tb``; :func:`plot_losses` draws the loss curves per mode."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

METRICS = "metrics.jsonl"


def _flatten(d: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    for k, v in d.items():
        name = f"{prefix}/{k}" if prefix else str(k)
        if isinstance(v, dict):
            yield from _flatten(v, name)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            yield name, float(v)


class MetricsLog:
    """Append-only metrics: JSON lines (the record) and TensorBoard scalars (for viewing).

    Lines are flushed as written, so a killed run keeps every logged step. ``tensorboard=False``
    skips the event files (e.g. in tests).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / METRICS
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def log(self, record: dict[str, Any]) -> None:
        """Write one record; it must hold ``step``."""
        if "step" not in record:
            raise ValueError("a metrics record needs a 'step'")
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()
        if self._tb is not None:
            for name, value in _flatten({k: v for k, v in record.items() if k != "step"}):
                self._tb.add_scalar(name, value, record["step"])

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of ``RUN/metrics.jsonl`` (a torn last line from a kill is ignored)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        raise FileNotFoundError(f"no {METRICS} in {run_dir}")
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}:{i + 1}: not valid JSON") from None
    return out


def plot_losses(run_dir: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Draw ``loss`` (bits per element, per mode) against ``step``, and any ``eval`` losses."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    series: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for kind in ("loss", "eval_loss"):
            for mode, v in (r.get(kind) or {}).items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    xs, ys = series.setdefault(f"{mode} ({'train' if kind == 'loss' else 'eval'})",
                                               ([], []))
                    xs.append(r["step"])
                    ys.append(v)
    if not series:
        raise ValueError(f"no loss values in {Path(run_dir) / METRICS}")
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    for name, (xs, ys) in sorted(series.items()):
        ax.plot(xs, ys, label=name, linestyle="--" if "eval" in name else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per element")
    ax.set_title(f"loss per mode: {Path(run_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
