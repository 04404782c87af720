"""``blocktool bench read``: one run prints every reader's figures; --json has the agreed keys."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from blocklm.tools.cli import main

KEYS = ("raw", "webdataset", "blocklm", "blocklm_decode")


def test_bench_read_json(small_shards):
    r = CliRunner().invoke(main, ["bench", "read", str(small_shards), "--json", "--repeat", "1",
                                  "--rss-epochs", "6"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    for k in KEYS:
        assert res[k]["samples_per_s"] > 0 and res[k]["MBps"] > 0
        assert res[k]["samples"] == res["samples"]
    assert res["rss_mb"] > 0 and res["rss_epochs"]["epochs"] == 6
    assert res["verify"] is True  # the reported row checks every payload's checksum
    assert res["rss_now"]["anon_mb"] > 0 and res["rss_now"]["file_mb"] >= 0


def test_bench_read_table_through_nginx(small_shards):
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx not installed")
    r = CliRunner().invoke(main, ["bench", "read", str(small_shards), "--nginx", "--repeat", "1",
                                  "--no-decode"])
    assert r.exit_code == 0, r.output
    assert "http://127.0.0.1:" in r.output
    for k in ("raw", "webdataset", "blocklm", "blocklm_local", "through nginx / local", "peak RSS"):
        assert k in r.output


def test_bench_read_nginx_json_has_the_local_row_of_the_same_run(small_shards):
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx not installed")
    r = CliRunner().invoke(main, ["bench", "read", str(small_shards), "--nginx", "--repeat", "2",
                                  "--no-decode", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["via"] == "nginx" and res["sources"][0].startswith("http://127.0.0.1:")
    for k in ("blocklm", "blocklm_local"):
        assert res[k]["samples"] == res["samples"] and res[k]["bytes"] > 0
    assert res["blocklm"]["bytes"] == res["blocklm_local"]["bytes"]  # the same payloads
    ratio = res["blocklm"]["MBps"] / res["blocklm_local"]["MBps"]
    assert res["nginx_vs_local"] == pytest.approx(ratio, abs=1e-3)


def test_bench_read_help_has_an_example():
    r = CliRunner().invoke(main, ["bench", "read", "--help"])
    assert r.exit_code == 0 and "blocktool bench read data/shards/mixed" in r.output


def test_bench_read_without_the_map_cache(small_shards):
    r = CliRunner().invoke(main, ["bench", "read", str(small_shards), "--json", "--repeat", "1",
                                  "--no-decode", "--map-cache-mb", "0"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert res["map_cache_bytes"] == 0 and res["blocklm"]["samples"] == res["samples"]


def test_bench_read_ceiling_receives_every_shard_byte(small_shards):
    if shutil.which("nginx") is None and not os.path.exists("/usr/sbin/nginx"):
        pytest.skip("nginx not installed")
    from blocklm.tools.bench_read import http_ceiling, serve_nginx

    with serve_nginx([small_shards]) as urls:
        base = urls[small_shards]
        names = sorted(p.name for p in small_shards.glob("*.tar"))
        sizes = [(small_shards / n).stat().st_size for n in names]
        # ranges smaller than a shard: several requests per shard on the one connection
        assert http_ceiling([f"{base}/{n}" for n in names], sizes, 4096) == (0, sum(sizes))
    r = CliRunner().invoke(main, ["bench", "read", str(small_shards), "--nginx", "--ceiling",
                                  "--repeat", "1", "--no-decode", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert set(res["http_ceiling"]) == {"2MiB", "8MiB"}
    assert all(v > 0 for v in res["http_ceiling"].values())


def test_bench_read_names_a_source_that_is_not_a_dataset(tmp_path):
    """`bench read data/shards/*` also globs make_shards.json: a clear error naming the file,
    exit 1, not a traceback (it printed one before)."""
    bad = tmp_path / "make_shards.json"
    bad.write_text('{"stamp": 1}')
    r = CliRunner().invoke(main, ["bench", "read", str(bad), "--repeat", "1", "--no-decode"])
    assert r.exit_code == 1, r.output
    assert "error:" in r.output and "make_shards.json" in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
