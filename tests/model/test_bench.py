"""The model benchmark's plumbing (the benchmark itself runs with `blocktool bench model`)."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from blocklm.model.bench_heads import run_heads
from blocklm.model.bench_tasks import DyckTask, RecallTask, ReversalTask, curriculum
from blocklm.tools.bench_model import bench_model, table


def test_help_has_an_example():
    out = CliRunner().invoke(bench_model, ["--help"])
    assert out.exit_code == 0 and "Example" in out.output and "--quick" in out.output


def test_reversal_batches_are_reversals():
    g = torch.Generator().manual_seed(0)
    tok, steps, tgt, lm = ReversalTask(symbols=4).batch(5, 1, 6, g)
    for i in range(5):
        n = int(steps[i].sum()) // 2
        assert tok[i, n] == 4 and torch.equal(tgt[i][lm[i]], tok[i, :n].flip(0))
        assert bool((tok[i, n + 1:2 * n] == 5).all())


def test_recall_queries_ask_for_stored_values():
    g = torch.Generator().manual_seed(0)
    t = RecallTask(keys=8, values=4, pairs=5, queries=3)
    tok, _, tgt, lm = t.batch(2, g)
    for i in range(2):
        store = {int(k): int(v) for k, v in tok[i, :5].tolist()}
        for j in range(5, 8):
            assert tok[i, j, 1] == 4 and store[int(tok[i, j, 0])] == int(tgt[i, j])
    assert lm[:, 5:].all() and not lm[:, :5].any()


def test_curriculum_grows_then_holds():
    assert curriculum(40, 0.0) == 4 and curriculum(40, 0.25) == 22 and curriculum(40, 0.9) == 40


def test_heads_skip_without_data(tmp_path):
    res = run_heads(str(tmp_path / "missing"), "tok.model", 1, 0)
    assert res == {"skipped": f"no {tmp_path / 'missing'}: run make shards"}


def test_table_renders_every_section():
    res = {"stack": {"train_len": 40, "test_len": 100, "accuracy_long": 1.0,
                     "no_stack_accuracy_long": 0.3,
                     "dyck2": {"train_len": 40, "test_len": 100, "accuracy_long": 1.0,
                               "no_stack_accuracy_long": 0.88}},
           "banks": {"pairs": 24, "accuracy_banks_1": 0.4, "accuracy_banks_8": 0.9},
           "heads": {"skipped": "no data/shards/mixed: run make shards"}}
    text = table(res)
    assert "41-100" in text and "8 banks vs 1" in text and "skipped" in text
    assert "dyck-2 acc, len 42-100" in text
    json.dumps(res)


def test_dyck_targets_are_the_innermost_open_bracket():
    g = torch.Generator().manual_seed(3)
    tok, steps, tgt, lm = DyckTask().batch(6, 2, 20, g)
    for i in range(6):
        stack = []
        for t in range(int(steps[i].sum())):
            k = int(tok[i, t])
            if k < 2:
                stack.append(k)
            else:
                assert stack and stack.pop() == k - 2  # closers match
            assert int(tgt[i, t]) == (stack[-1] if stack else 2)
        assert stack == []  # balanced
