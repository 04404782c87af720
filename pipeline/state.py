"""Loader state dicts: what they hold and how to find them inside a DataLoader's state.

A :class:`~blocklm.pipeline.BlockDataset` state records the epoch, the positions consumed before
the current pass began (``base``, as intervals of the rank's positions) and, for the pass, the
worker split it runs under (``workers``, ``worker``) and how many samples that worker has yielded
(``yielded``). Since orders are pure functions of the seed, the consumed set is recomputable from
this, so states of all workers of one DataLoader can be merged and resumed under any number of
workers. ``torchdata``'s ``StatefulDataLoader`` stores one such state per worker.
"""

from __future__ import annotations

from typing import Any

from .errors import StateError

LOADER_KEY = "blocklm_loader"
MIX_KEY = "blocklm_mix"
STATE_VERSION = 1


def extract_states(state: Any, key: str) -> list[dict[str, Any]]:
    """The dataset states inside ``state``: one of ours, a list of ours, or a (torchdata)
    ``StatefulDataLoader.state_dict()`` with zero or more workers. Workers that have not
    reported yet (``None``) are left out."""
    if isinstance(state, (list, tuple)):
        out: list[dict[str, Any]] = []
        for s in state:
            out.extend(extract_states(s, key))
        return out
    if not isinstance(state, dict):
        raise StateError(f"not a loader state: {type(state).__name__}")
    if key in state:
        if state[key] != STATE_VERSION:
            raise StateError(f"unsupported state version {state[key]!r}")
        return [state]
    snap = state.get("_snapshot")
    if isinstance(snap, dict) and "_worker_snapshots" in snap:
        out = []
        for w in snap["_worker_snapshots"].values():
            ds = (w or {}).get("dataset_state")
            if ds is not None:
                out.extend(extract_states(ds, key))
        return out
    if "dataset_state" in state:
        ds = state["dataset_state"]
        return [] if ds is None else extract_states(ds, key)
    raise StateError(f"no {key!r} state found (keys: {sorted(state)[:8]})")


def check_same(states: list[dict[str, Any]], field: str) -> Any:
    """The common value of ``field`` in all states (StateError if they differ)."""
    values = {repr(s.get(field)) for s in states}
    if len(values) > 1:
        raise StateError(f"states disagree on {field!r}: {sorted(values)}")
    return states[0].get(field)


def check_workers_unique(states: list[dict[str, Any]]) -> None:
    """Worker states of one pass come from distinct workers of the same split. (A worker with
    no state has yielded nothing, so a missing one only means its share is untouched.)"""
    passes = [s for s in states if s.get("workers") is not None]
    if not passes:
        return
    check_same(passes, "workers")
    got = [s["worker"] for s in passes]
    if len(set(got)) != len(got):
        raise StateError(f"duplicate worker states {sorted(got)}")
