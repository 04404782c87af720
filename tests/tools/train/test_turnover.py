"""Epoch turnovers of the trainer: what runs between one epoch's last step and the next one's
first (bench train's data wait at turnovers), without changing the batches. Turnovers are those of
per-epoch runs (``train.chain_epochs=false``): chained epochs have none (test_chain.py)."""

from __future__ import annotations

import gc
import threading

import pytest

from blocklm.formats import text_block
from blocklm.tools.train import readahead
from blocklm.tools.train.loop import RunSpec, Trainer
from blocklm.tools.train.loop_util import FULL_GC_EVERY

from .textsets import phrase, write_samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """40 one-block text samples: an epoch fits in flight (tiny preset: 256), as the small
    preset's 8,192 hold the whole text set (7,222), so every epoch is admitted at once."""
    return write_samples(tmp_path_factory.mktemp("text"), 40,
                         lambda i: [text_block(phrase(i, 3, 5))], max_samples=16, prefix="t")


def _trainer(tmp_path, dataset, tokenizer) -> Trainer:
    spec = RunSpec("tiny", [dataset], None, [
        # 320 tokens a step: epochs go by as at 200 before the texts were charged their exact
        # tokens (train.cost_from_content; the test tokenizer's ~2.5 characters a token)
        f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=320",
        "dispatch.budget=100", "train.log_every=1000", "train.checkpoint_every=0",
        "train.chain_epochs=false"])  # turnovers: one dispatcher run per epoch
    return Trainer(tmp_path / "run", spec, resume=False, remote=None, progress=False,
                   tensorboard=False)


def _record(tr: Trainer, events: list) -> None:
    run = tr.runners.run

    def on_run(mode, batch):
        events.append(("run", tr.epoch, tuple(r.key for r in batch.requests),
                       gc.get_freeze_count(), gc.get_threshold()))
        return run(mode, batch)
    tr.runners.run = on_run


def test_next_epoch_is_read_ahead_from_an_optimizer_step_not_during_admission(
        tmp_path, dataset, tokenizer, monkeypatch):
    """The whole epoch is drawn while it is admitted; a read-ahead started then competed for the
    GIL with that admission (and its garbage collections landed there). It now starts at the
    epoch's first optimizer step, after the epoch's first batches ran."""
    events: list = []
    init = readahead._Ahead.__init__

    def on_ahead(self, source, epoch, *a, **k):
        events.append(("ahead", epoch))
        init(self, source, epoch, *a, **k)
    monkeypatch.setattr(readahead._Ahead, "__init__", on_ahead)
    tr = _trainer(tmp_path, dataset, tokenizer)
    _record(tr, events)
    tr.fit(steps=12, minutes=None)
    assert tr.epoch >= 2
    for e in range(1, tr.epoch + 1):
        first_run = next(i for i, ev in enumerate(events) if ev[0] == "run" and ev[1] == e)
        started = events.index(("ahead", e + 1)) if ("ahead", e + 1) in events else None
        assert started is None or started > first_run, (e, events[:first_run + 1])
    assert ("ahead", 2) in events  # and it does read ahead


def test_batches_are_those_of_a_run_without_read_ahead(tmp_path, dataset, tokenizer):
    got = {}
    for depth in (None, 0):
        tr = _trainer(tmp_path / str(depth), dataset, tokenizer)
        if depth is not None:
            tr.ahead.depth = depth  # the plain loader, epoch after epoch
        events: list = []
        _record(tr, events)
        tr.fit(steps=12, minutes=None)
        got[depth] = [ev[1:3] for ev in events]
    assert got[None] == got[0] and len({e for e, _ in got[0]}) >= 3


def test_setup_objects_are_frozen_out_of_the_collector_while_fitting(tmp_path, dataset,
                                                                     tokenizer):
    """A full collection traversed every object of the process (model, optimizer, modules:
    125-240 ms) and fell at epoch turnovers; fit() freezes what exists when it starts."""
    assert gc.get_freeze_count() == 0
    before = gc.get_threshold()
    tr = _trainer(tmp_path, dataset, tokenizer)
    events: list = []
    _record(tr, events)
    out = tr.fit(steps=2, minutes=None)
    assert out["step"] == 2
    frozen = [ev[3] for ev in events]
    assert frozen and min(frozen) > 10_000  # the model and the imported modules at least
    # full collections (of what is not frozen: two epochs of samples, 20-75 ms) 5x rarer
    assert {ev[4] for ev in events} == {(*before[:2], max(before[2], FULL_GC_EVERY))}
    assert gc.get_freeze_count() == 0 and gc.get_threshold() == before  # restored at the end


def test_an_epoch_read_ahead_whole_is_admitted_without_the_prefetch_thread(tmp_path, dataset,
                                                                          tokenizer):
    """Handing 7,222 samples already in memory through the dispatcher's prefetch thread was a
    third of the turnover's admission (GIL hand-offs); from the second epoch on the read-ahead
    holds each (40-sample) epoch whole, so the dispatcher admits it in the trainer's thread."""
    tr = _trainer(tmp_path, dataset, tokenizer)
    runs: list = []
    run = tr.disp.run

    def on_run(source, **kw):
        runs.append((tr.epoch, kw.get("prefetch")))
        return run(source, **kw)
    tr.disp.run = on_run
    tr.fit(steps=12, minutes=None)
    assert runs[0] == (0, None)  # nothing was read ahead of the first epoch
    assert len(runs) >= 3 and all(p == 0 for _, p in runs[1:]), runs


@pytest.mark.slow  # two trainings of 12 steps: ~10 s on a busy 2-core machine
def test_whole_epochs_are_admitted_from_a_plan_built_in_the_read_ahead(tmp_path, dataset,
                                                                      tokenizer, monkeypatch):
    """At a turnover the trainer's thread admitted the next epoch one example at a time (~6 us
    each with its collections: 40-55 ms of the text set's turnovers in bench_turnover); the
    read-ahead thread now builds the examples and requests, the trainer's thread queues them.
    The batches are those of one-by-one admission (``plan=None``: the path before)."""
    import blocklm.pipeline.dispatch as dispatch
    from blocklm.tools.train import loop

    calls: list = []
    plan, admit = loop.plan_admission, dispatch.admit_planned

    def on_plan(d, samples, pieces, offset=0):
        calls.append(("plan", threading.current_thread().name, len(samples)))
        return plan(d, samples, pieces, offset)

    def on_admit(d, p):
        calls.append(("admit", threading.current_thread().name, len(p.examples)))
        admit(d, p)
    monkeypatch.setattr(loop, "plan_admission", on_plan)
    monkeypatch.setattr(dispatch, "admit_planned", on_admit)
    got = {}
    for planned in (True, False):
        calls.clear()
        tr = _trainer(tmp_path / str(planned), dataset, tokenizer)
        if not planned:
            tr.ahead.plan = None
        events: list = []
        _record(tr, events)
        tr.fit(steps=12, minutes=None)
        got[planned] = [ev[1:3] for ev in events]
        if planned:
            epochs = tr.epoch
            assert epochs >= 3
            assert [c for c in calls if c[0] == "admit"] == [
                ("admit", threading.main_thread().name, 40)] * epochs  # epochs 1.. (0: none)
            plans = [c for c in calls if c[0] == "plan"]
            assert len(plans) >= epochs and all(
                c[1].startswith("epoch-read-ahead-") and c[2] == 40 for c in plans), plans
        else:
            assert calls == []
    assert got[True] == got[False] and len({e for e, _ in got[True]}) >= 3
