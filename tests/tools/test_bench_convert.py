"""The convert benchmark runs its rows on a few files; option parsing of convert."""

from __future__ import annotations

import click
import pytest

from blocklm.tools.bench_convert import format_table, run_bench
from blocklm.tools.cmd_convert import parse_size


def test_bench_rows_on_a_few_files(image_dir, audio_dir):
    res = run_bench([str(image_dir), str(audio_dir)], repeat=1, workers=2, no_durable=True)
    assert res["files"] == 9
    names = [r["name"] for r in res["rows"]]
    assert names == ["plain read (I/O ceiling)", "webdataset.ShardWriter, 1 process",
                     "blocktool convert, 1 worker", "blocktool convert, 2 workers",
                     "blocktool convert --no-durable, 1 worker",
                     "blocktool convert --no-durable, 2 workers"]
    assert res["rows"][1]["vs_shardwriter"] == 1.0
    assert all(r["mb_per_s"] > 0 and r["cpu_seconds"] >= 0 for r in res["rows"])
    assert "| blocktool convert, 2 workers |" in format_table(res)
    assert "load average" in format_table(res).splitlines()[0]


def test_measure_runs_the_rows_in_rounds(tmp_path):
    """Rounds interleave the rows (a load change falls on all of them alike)."""
    from blocklm.tools.bench_convert import measure

    calls = []
    rows = [("a", lambda files, tmp: calls.append("a")), ("b", lambda files, tmp: calls.append("b"))]
    res = measure(rows, [], 3)
    assert calls == ["a", "b"] * 3 and len(res) == 2 and all(w >= 0 for w, _ in res)


def test_shard_size_parsing():
    assert parse_size("256M") == 256 << 20 and parse_size("1G") == 1 << 30
    assert parse_size("500k") == 500 << 10 and parse_size("4096") == 4096
    assert parse_size("1.5MiB") == 3 << 19
    for bad in ("lots", "0", "-1M"):
        with pytest.raises(click.BadParameter):
            parse_size(bad)


def test_a_convert_row_counts_its_helpers(image_dir, audio_dir, monkeypatch):
    """Helpers are not waited for by the conversion; the bench waits for them after the timed
    part, so a row's CPU seconds include its own helpers (and none are left for the next)."""
    from blocklm.tools import bench_convert, convert_parallel

    monkeypatch.setattr(convert_parallel, "MIN_CHUNK", 2)
    files = bench_convert.bench_files([str(image_dir), str(audio_dir)])
    wall, cpu = bench_convert._once(bench_convert.convert_with(2, [str(image_dir),
                                                                    str(audio_dir)]), files)
    assert wall > 0 and cpu > 0 and convert_parallel._RETIRED == []
