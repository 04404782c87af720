"""bench train-compare: two bench train runs over the steps that hold the same batches."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from blocklm.tools.bench_train_compare import bench_train_compare, same_steps
from blocklm.tools.cli import main


def _run(ms: list[float], real: list[int]) -> dict:
    return {"data": "d", "variant": "ring", "step_ms": ms, "step_real_tokens": real}


def _write(path, *runs) -> str:
    path.write_text(json.dumps(list(runs)))
    return str(path)


def test_the_shared_steps_end_where_the_batches_part():
    # a first run (slower by 10%, one stalled step) against a second; their 4th steps differ
    a = _run([110.0, 330.0, 110.0, 100.0, 100.0], [1000, 1000, 1000, 2000, 500])
    b = _run([100.0, 100.0, 100.0, 100.0], [1000, 1000, 1000, 1500])
    r = same_steps(a, b, top=2)
    assert (r["steps"], r["steps_a"], r["steps_b"]) == (3, 5, 4)
    assert r["real_tokens_per_s_a"] == round(3000 / 0.55)
    assert r["real_tokens_per_s_b"] == 10000
    assert r["b_over_a"] == round(10000 / (3000 / 0.55), 4)
    assert r["median_ms_b_minus_a"] == -10.0
    assert r["most_different"] == [[1, 110.0, 100.0], [2, 330.0, 100.0]]


def test_runs_with_other_batches_share_no_steps():
    r = same_steps(_run([1.0], [5]), _run([1.0], [6]))
    assert r == {"steps": 0, "steps_a": 1, "steps_b": 1}


def test_the_command_prints_both_runs_over_the_shared_steps(tmp_path):
    a = _write(tmp_path / "a.json", _run([200.0, 200.0], [1000, 1000]))
    b = _write(tmp_path / "b.json", _run([100.0, 100.0, 50.0], [1000, 1000, 7]))
    r = CliRunner().invoke(main, ["bench", "train-compare", a, b])
    assert r.exit_code == 0, r.output
    assert "2 shared steps (of 2 and 3)" in r.output
    assert "A 5,000, B 10,000, B/A 2.000" in r.output
    r = CliRunner().invoke(bench_train_compare, [a, b, "--json"])
    assert json.loads(r.output)["b_over_a"] == 2.0


def test_no_shared_steps_says_what_to_do(tmp_path):
    a = _write(tmp_path / "a.json", _run([1.0], [5]))
    b = _write(tmp_path / "b.json", _run([1.0], [6]))
    r = CliRunner().invoke(bench_train_compare, [a, b])
    assert r.exit_code == 0 and "no shared steps" in r.output
    assert "Compare whole windows instead" in r.output


@pytest.mark.parametrize("content,why", [
    ("{not json", "not a readable bench train JSON file"),
    ("[]", "has no run 0"),
    ('[{"data": "d", "error": "OutOfMemoryError: at step 3"}]',
     "no per-step figures (step_ms, step_real_tokens); it failed: OutOfMemoryError"),
    ('[{"data": "d", "steps": 4}]', "written by an older bench?"),
])
def test_a_file_it_cannot_use_is_named_with_the_reason(tmp_path, content, why):
    good = _write(tmp_path / "good.json", _run([1.0], [5]))
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    r = CliRunner().invoke(bench_train_compare, [good, str(bad)])
    assert r.exit_code == 1
    assert str(bad) in r.output and why in r.output


def test_the_command_names_each_runs_machine(tmp_path):
    ma = {"cpu": "Xeon A", "cpus": 16, "python_loop_ns": 30.0, "op_launch_us": 4.0}
    a = _write(tmp_path / "a.json", dict(_run([100.0], [10]), machine=ma,
                                         machine_after=dict(ma, python_loop_ns=29.0)))
    b = _write(tmp_path / "b.json", _run([100.0], [10]))  # written before runs had machines
    r = CliRunner().invoke(bench_train_compare, [a, b])
    assert r.exit_code == 0, r.output
    assert ("A: loop 30.0 ns, op 4.0 us (Xeon A, 16 CPUs); after its runs: loop 29.0 ns, "
            "op 4.0 us (Xeon A, 16 CPUs)") in r.output
    assert "B: machine not recorded" in r.output
    r = CliRunner().invoke(bench_train_compare, [a, b, "--json"])
    assert json.loads(r.output)["machine_a"] == ma
