"""``blocktool bench heads`` on the CPU: both forms run through the checkpointed slices, agree,
and the table comes last."""

from __future__ import annotations

import json

from click.testing import CliRunner

from blocklm.tools.cli import main


def test_bench_heads_runs_both_forms_and_prints_the_table_last():
    res = CliRunner().invoke(main, ["bench", "heads", "--device", "cpu", "--preset", "tiny",
                                    "--image", "2x300", "--audio", "3x20", "--forms",
                                    "eager,aot_eager", "--reps", "1", "--json"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    rows = json.loads(lines[0])
    assert [(r["mode"], r["form"]) for r in rows] == [
        ("image", "eager"), ("image", "aot_eager"), ("audio", "eager"), ("audio", "aot_eager")]
    assert rows[0]["T"] == 300 > 256  # more than one checkpointed slice of the image loss
    for r in rows[1::2]:  # the compiled form against the eager one
        assert r["rel_bits"] < 1e-5 and r["rel_dh"] < 1e-4 and r["rel_dval"] < 1e-4, r
    assert all(r["ms"] > 0 for r in rows)
    assert lines[1].split()[:2] == ["mode", "form"] and len(lines) == 6


def test_bad_options_are_refused_with_what_was_wrong():
    for args, msg in ((["--image", "32by2401"], "not a batch shape like 32x2401"),
                      (["--audio", "0x5"], "B and T must be at least 1"),
                      (["--forms", "eager,fast"], "forms are eager, inductor, aot_eager"),
                      (["--reps", "0"], "--reps")):
        res = CliRunner().invoke(main, ["bench", "heads", "--device", "cpu", *args])
        assert res.exit_code == 2 and msg in res.output, (args, res.output)
