"""A resumed run refuses settings that would form other batches than the saved run's
(tools/train/batching.py), naming each and the overrides that restore it."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch

from blocklm.formats import text_block
from blocklm.pipeline.dispatch_resume import config_fingerprint
from blocklm.tools.train.batching import batching_differences, window_record
from blocklm.tools.train.config import TrainConfig, build_config
from blocklm.tools.train.loop import RunSpec, train
from blocklm.tools.train.metrics import read_metrics

from .textsets import phrase, write_samples


def _disp(**kw):
    cfg = build_config("tiny", [f"dispatch.{k}={json.dumps(v)}" for k, v in kw.items()])
    return SimpleNamespace(config=cfg.dispatch)


def test_no_difference_no_complaint():
    t, d = TrainConfig(window_mode_max={"image": 2.0}), _disp()
    assert batching_differences(window_record(t), config_fingerprint(d), d, t, []) == []


def test_each_difference_is_named_with_the_override_that_restores_it():
    saved_t = TrainConfig(window_max=1.5, window_mode_max={})
    saved_d = config_fingerprint(_disp(mode_budget={"image": 98304}, max_batch_samples=1024))
    now = TrainConfig(window_max=1.5, window_mode_max={"image": 2.0})  # chained (the default)
    d = _disp(mode_budget={"image": 131072}, max_batch_samples=1536,
              mode_stall_weight={"image": 0.25})
    diffs = {k: (s, n, o) for k, s, n, o in
             batching_differences(window_record(saved_t), saved_d, d, now, [])}
    assert diffs["window_mode_max"] == ({}, {"image": 2.0}, "train.window_mode_max={}")
    assert diffs["mode_budget"][2] == 'dispatch.mode_budget={"image": 98304}'
    # chained, the dispatcher's cap comes from train.chain_batch_samples
    assert diffs["max_batch_samples"] == (1024, 1536, "train.chain_batch_samples=1024")
    # a key the older state left out when unset: its unset value, restorable
    assert diffs["mode_stall_weight"] == ({}, {"image": 0.25}, "dispatch.mode_stall_weight={}")
    assert set(diffs) == {"window_mode_max", "mode_budget", "max_batch_samples",
                          "mode_stall_weight"}


def test_a_checkpoint_without_a_window_record_had_no_mode_rooms_unless_its_run_set_them():
    # (such a checkpoint charged blocks by their shapes too: test_cost_from_content_...)
    t, d = TrainConfig(window_mode_max={"image": 2.0}, cost_from_content=False), _disp()
    fp = config_fingerprint(d)
    assert [k for k, *_ in batching_differences(None, fp, d, t, [])] == ["window_mode_max"]
    mine = ['train.window_mode_max={"image": 2.0}']  # the run's own override: it had them
    assert batching_differences(None, fp, d, t, mine) == []


def test_the_state_cap_is_a_batching_setting_and_older_records_had_none():
    """train.window_max_state_gib closes windows, so it forms batches: a change is named with
    its override; a record written before it existed had no such cap."""
    d = _disp()
    fp = config_fingerprint(d)
    capped, plain = TrainConfig(window_max_state_gib=32.0), TrainConfig()
    assert batching_differences(window_record(capped), fp, d, capped, []) == []
    assert batching_differences(window_record(plain), fp, d, capped, []) == [
        ("window_max_state_gib", None, 32.0, "train.window_max_state_gib=none")]
    assert batching_differences(window_record(capped), fp, d, plain, []) == [
        ("window_max_state_gib", 32.0, None, "train.window_max_state_gib=32.0")]
    old = {k: v for k, v in window_record(plain).items() if k != "window_max_state_gib"}
    assert batching_differences(old, fp, d, plain, []) == []
    assert [k for k, *_ in batching_differences(old, fp, d, capped, [])] == \
        ["window_max_state_gib"]


def test_cost_from_content_is_a_batching_setting_and_older_records_charged_by_shape():
    """train.cost_from_content changes every text block's cost and bucket: a change is named
    with its override, and a record written before the setting (or none at all) charged
    blocks by their shapes, so resuming one under the new default is refused."""
    d = _disp()
    fp = config_fingerprint(d)
    on, off = TrainConfig(), TrainConfig(cost_from_content=False)
    assert on.cost_from_content is True  # the default
    assert batching_differences(window_record(on), fp, d, on, []) == []
    assert batching_differences(window_record(off), fp, d, on, []) == [
        ("cost_from_content", False, True, "train.cost_from_content=false")]
    old = {k: v for k, v in window_record(off).items() if k != "cost_from_content"}
    assert batching_differences(old, fp, d, off, []) == []
    assert batching_differences(old, fp, d, on, [])[0][:3] == ("cost_from_content", False, True)
    assert [k for k, *_ in batching_differences(None, fp, d, on, [])] == ["cost_from_content"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return write_samples(tmp_path_factory.mktemp("batching"), 30,
                         lambda i: [text_block(phrase(i, 2, 6))], max_samples=8, prefix="s")


def _spec(dataset, tokenizer, *extra) -> RunSpec:
    return RunSpec("tiny", [dataset], None, [
        f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=150",
        "dispatch.budget=100", "dispatch.max_in_flight=12", "train.log_every=1",
        "train.warmup=2", "train.checkpoint_every=0", "train.window_max=1.2", *extra])


def _refused_then_exact(tmp_path, dataset, tokenizer, override: str, match: str) -> str:
    """Runs of 6 and of 3 steps with ``override``; the shorter one's run.json loses it (as a
    preset that changed under it), its resume is refused (``match``) naming the override to
    put back; put back, it resumes to the longer run's losses. Returns the refusal."""
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, _spec(dataset, tokenizer, override), steps=6, progress=False, tensorboard=False)
    train(half, _spec(dataset, tokenizer, override), steps=3, progress=False, tensorboard=False)
    meta = json.loads((half / "run.json").read_text())
    meta["overrides"].remove(override)
    (half / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=match) as e:
        train(half, steps=6, resume=True, progress=False, tensorboard=False)
    fix = re.findall(r"'([^']+)'$", str(e.value))
    assert fix == [override] and str(half / "run.json") in str(e.value)
    meta["overrides"] += fix
    (half / "run.json").write_text(json.dumps(meta))
    train(half, steps=6, resume=True, progress=False, tensorboard=False)
    assert [r["loss"] for r in read_metrics(half)] == [r["loss"] for r in read_metrics(full)]
    return str(e.value)


def test_a_run_whose_window_rooms_changed_refuses_to_resume_and_says_how(tmp_path, dataset,
                                                                        tokenizer):
    """The preset changing under a run (here: its mode room dropped from run.json, as a preset
    that gains or loses one) resumed silently with other batches before; now the resume names
    the setting and the override, and with the override it resumes exactly."""
    room = 'train.window_mode_max={"text": 2.0}'
    _refused_then_exact(tmp_path, dataset, tokenizer, room,
                        r"window_mode_max: saved \{'text': 2.0\}, now \{\}")
    ck = torch.load(tmp_path / "half" / "checkpoint.pt", weights_only=True)
    assert ck["loader"]["windows"] == {"window_max": 1.2, "window_mode_max": {"text": 2.0},
                                       "window_max_state_gib": None, "cost_from_content": True}


def test_a_run_charged_by_shape_resumes_only_so_and_then_exactly(tmp_path, dataset, tokenizer):
    """A run started with train.cost_from_content=false (texts charged by their characters, as
    every run before the setting) formed other batches than the default's: resumed under the
    default it is refused with the override named; with it, it resumes exactly."""
    _refused_then_exact(tmp_path, dataset, tokenizer, "train.cost_from_content=false",
                        r"cost_from_content: saved False, now True")


def test_a_changed_dispatch_budget_is_named_before_the_dispatcher_restores(tmp_path, dataset,
                                                                          tokenizer):
    run = tmp_path / "run"
    train(run, _spec(dataset, tokenizer), steps=2, progress=False, tensorboard=False)
    meta = json.loads((run / "run.json").read_text())
    meta["overrides"].append("dispatch.budget=120")
    (run / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"budget: saved 100, now 120.*'dispatch.budget=100'"):
        train(run, steps=4, resume=True, progress=False, tensorboard=False)
