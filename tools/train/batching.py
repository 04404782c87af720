"""What forms a run's batches, recorded in its checkpoints and checked when it resumes.

A resumed run rebuilds exactly the batches the run would have formed (README, "exact
resumption"), which holds only if the settings that form them are the ones it was saved with:
the dispatcher's (its config fingerprint, checked by :func:`restore_examples
<blocklm.pipeline.dispatch_resume.restore_examples>` too), the trainer's window rooms
(``train.window_max``, ``train.window_mode_max``), which limit each batch to the room left in its
optimizer step, its state cap (``train.window_max_state_gib``), which can close a window
before its tokens do, and ``train.cost_from_content`` (texts charged and bucketed by their
tokens, not their characters). A run's config is rebuilt from its preset at resume, so a preset that
changed since the run started (the ``small`` preset's image window room and 1,536-example
batches, say) would silently form other batches. This module names every difference and the
overrides in ``RUN/run.json`` that restore the saved values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_resume import FINGERPRINT_UNSET, config_fingerprint

from .config import TrainConfig

WINDOW_KEYS = ("window_max", "window_mode_max", "window_max_state_gib", "cost_from_content")
# what a record without the key formed its batches with (the setting came later)
BEFORE_KEY = {"window_max_state_gib": None, "cost_from_content": False}


def window_record(t: TrainConfig) -> dict[str, Any]:
    """The trainer's settings that form its batches (for a checkpoint; the dispatcher's own are
    in its state, ``state["config"]``): its window rooms and state cap, and whether blocks are
    charged by their content's cost shape (``train.cost_from_content``)."""
    return {"window_max": t.window_max, "window_mode_max": dict(t.window_mode_max),
            "window_max_state_gib": t.window_max_state_gib,
            "cost_from_content": t.cost_from_content}


def _override(key: str, value: Any, chained: bool) -> str:
    if key == "max_batch_samples" and chained:  # lowered from train.chain_batch_samples
        return f"train.chain_batch_samples={'none' if value is None else value}"
    prefix = "train." if key in WINDOW_KEYS else "dispatch."
    return f"{prefix}{key}={'none' if value is None else json.dumps(value)}"


def batching_differences(saved: dict[str, Any] | None, saved_dispatch: dict[str, Any],
                         disp: Dispatcher, t: TrainConfig,
                         overrides: list[str]) -> list[tuple[str, Any, Any, str]]:
    """(setting, saved value, this run's value, override restoring the saved value) for each
    setting that differs: the trainer's (``saved``, :func:`window_record`) and the dispatcher's
    (``saved_dispatch``, its saved config fingerprint, against ``disp``'s). ``saved`` None: a
    checkpoint from before the trainer recorded its windows; those predate ``window_mode_max``
    in any preset, so unless the run's own ``overrides`` set it, its mode rooms were none."""
    now = window_record(t)
    if saved is None:
        explicit = any(o.startswith("train.window_mode_max=") for o in overrides)
        saved = {} if explicit else {"window_mode_max": {}}
    out = []
    chained = t.chain_epochs and t.chain_batch_samples is not None
    for key in WINDOW_KEYS:
        # a record without window_max_state_gib predates it (its windows closed on tokens
        # alone), one without cost_from_content charged blocks by their shapes
        if key not in saved and key not in BEFORE_KEY:
            continue
        was = saved.get(key, BEFORE_KEY.get(key))
        if was != now[key]:
            out.append((key, was, now[key], _override(key, was, chained)))
    sd, nd = saved_dispatch, config_fingerprint(disp)
    for key in sorted(set(sd) | set(nd)):
        a, b = sd.get(key, FINGERPRINT_UNSET.get(key)), nd.get(key, FINGERPRINT_UNSET.get(key))
        if a != b:
            out.append((key, a, b, _override(key, a, chained)))
    return out


def check_batching(run: Path, saved: dict[str, Any] | None, saved_dispatch: dict[str, Any],
                   disp: Dispatcher, t: TrainConfig, overrides: list[str]) -> None:
    """Refuse to resume ``run`` when the settings that form its batches differ from the saved
    ones, naming each and the overrides to add to ``run/run.json``."""
    diffs = batching_differences(saved, saved_dispatch, disp, t, overrides)
    if diffs:
        what = "; ".join(f"{k}: saved {s!r}, now {n!r}" for k, s, n, _ in diffs)
        fix = " ".join(repr(o) for *_, o in diffs)
        raise ValueError(f"{run}: the checkpoint's batches were formed with other settings "
                         f"({what}), so a resumed run would not rebuild them (has the preset "
                         f"changed since the run started?). To resume exactly, add to the "
                         f"overrides in {run / 'run.json'}: {fix}")
