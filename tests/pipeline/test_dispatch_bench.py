"""The dispatcher over real shards (shapes from the indexes) and the benchmark command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from blocklm.formats import Block, Sample, ShardWriter, iter_dataset
from blocklm.pipeline.buckets import buckets_from_index
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig, Result
from blocklm.tools.bench_dispatch import bench_dispatch

CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"


def write_dataset(path: Path) -> list[Sample]:
    samples = [Sample(f"t{i}", [Block("text", (len(s),), "utf8", s.encode()),
                                Block("text", (3,), "utf8", b"end")])
               for i, s in enumerate(["to be", "or not to be", "that is the question"] * 4)]
    with ShardWriter(path, max_samples=5) as w:
        for s in samples:
            w.write(s)
    return samples


def test_buckets_from_index_and_dispatch_decoded_dataset(tmp_path):
    samples = write_dataset(tmp_path / "ds")
    spec = buckets_from_index(str(tmp_path / "ds"), min_share=0)
    assert spec.of("text").bounds == ((3, 5, 12, 20),)  # exact: few distinct lengths
    seen = []

    def runner(batch):
        seen.extend((r.key, r.block, r.inputs) for r in batch.requests)
        return [Result() for _ in batch.requests]

    d = Dispatcher({"text": runner}, spec, DispatchConfig(budget=64, prefetch=4))
    for _ in d.run(iter_dataset(str(tmp_path / "ds"))):
        pass
    # inputs were decoded in the prefetch thread by the block's codec
    expected = {(s.key, i, b.payload.decode()) for s in samples for i, b in enumerate(s.blocks)}
    assert set(seen) == expected and len(seen) == len(expected)


def test_bench_command_index_and_synthetic(tmp_path):
    write_dataset(tmp_path / "ds")
    runner = CliRunner()
    res = runner.invoke(bench_dispatch, [str(tmp_path / "ds"), "--json", "--repeat", "2",
                                         "--min-requests", "100", "--timing-runs", "1"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out) >= {"bucketed", "fifo", "requests_per_s"}
    for kind in ("bucketed", "fifo"):
        assert set(out[kind]["text"]) >= {"padding_ratio", "ttl_forced_fraction", "batches",
                                          "queue_age_p99"}
    assert out["bucketed"]["text"]["padding_ratio"] == 0.0  # exact-length buckets
    assert out["fifo"]["text"]["padding_ratio"] > 0.0
    assert out["requests_per_s"] > 0
    res = runner.invoke(bench_dispatch, [])
    assert res.exit_code != 0 and "SOURCE or --synthetic" in res.output
    if CORPORA.is_dir():
        res = runner.invoke(bench_dispatch, ["--synthetic", "--corpora", str(CORPORA), "--repeat",
                                             "1", "--min-requests", "1", "--timing-runs", "1"])
        assert res.exit_code == 0, res.output
        assert "audio" in res.output and "image" in res.output


@pytest.mark.parametrize("flag", ["--help"])
def test_bench_help_has_an_example(flag):
    res = CliRunner().invoke(bench_dispatch, [flag])
    assert res.exit_code == 0 and "blocktool bench dispatch" in res.output
