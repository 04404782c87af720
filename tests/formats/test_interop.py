"""Shards are ordinary tar files: `tar` lists and extracts them, webdataset iterates them."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import webdataset as wds

from blocklm.formats import Sample, ShardWriter, bytes_block, iter_index, text_block


@pytest.fixture
def dataset(tmp_path):
    samples = [Sample(f"s{i:02d}", [text_block(f"passage {i}"), bytes_block("x", (1,), b"z")])
               for i in range(7)]
    samples.append(Sample("dir/nested", [text_block("nested key")]))
    with ShardWriter(tmp_path / "ds", max_samples=3) as w:
        for s in samples:
            w.write(s)
    return tmp_path / "ds", samples


def test_webdataset_yields_every_key(dataset):
    path, samples = dataset
    urls = sorted(str(p) for p in path.glob("*.tar"))
    got = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == [s.key for s in samples]
    first = got[0]
    assert first["0.text.txt"] == b"passage 0" and "blocks.json" in first


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar binary")
def test_tar_lists_and_extracts(dataset, tmp_path):
    path, samples = dataset
    names = subprocess.run(["tar", "-tf", str(path / "shard-000000.tar")], check=True,
                           capture_output=True, text=True).stdout.split()
    assert names == ["s00.blocks.json", "s00.0.text.txt", "s00.1.x.bin",
                     "s01.blocks.json", "s01.0.text.txt", "s01.1.x.bin",
                     "s02.blocks.json", "s02.0.text.txt", "s02.1.x.bin"]
    out = tmp_path / "x"
    out.mkdir()
    subprocess.run(["tar", "-xf", str(path / "shard-000000.tar"), "-C", str(out)], check=True)
    assert (out / "s01.0.text.txt").read_text() == "passage 1"
    assert [e.key for _, e in iter_index(path)] == [s.key for s in samples]
