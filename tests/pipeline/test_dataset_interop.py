"""The shards are plain tar: webdataset and Hugging Face datasets read them with the same keys."""

from __future__ import annotations

import warnings

import pytest

from blocklm.formats import Sample, ShardWriter, bytes_block, text_block
from blocklm.pipeline import BlockDataset


def test_webdataset_reads_the_same_keys(small_shards):
    wds = pytest.importorskip("webdataset")
    ours = [s.key for s in BlockDataset(small_shards, shuffle=False)]
    urls = sorted(str(p) for p in small_shards.glob("*.tar"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False,
                                                         empty_check=False)]
    assert theirs == ours
    first = next(iter(wds.WebDataset(urls[:1], shardshuffle=False, empty_check=False)))
    assert first["blocks.json"].startswith(b"{") and b'"key":"s00000"' in first["blocks.json"]


def test_hf_datasets_reads_the_same_keys(tmp_path):
    # datasets' webdataset builder wants every sample to have the same members (it infers one
    # feature set from the first samples), so this dataset has one layout: text + bytes.
    datasets = pytest.importorskip("datasets")
    with ShardWriter(tmp_path / "ds", max_samples=8) as w:
        for i in range(20):
            w.write(Sample(f"k{i:03d}", [text_block(f"text {i}"),
                                         bytes_block("raw", (2,), bytes([i, i]))]))
    ours = [s.key for s in BlockDataset(tmp_path / "ds", shuffle=False)]
    urls = sorted(str(p) for p in (tmp_path / "ds").glob("*.tar"))
    ds = datasets.load_dataset("webdataset", data_files={"train": urls}, split="train",
                               streaming=True)
    rows = list(ds)
    assert [row["__key__"] for row in rows] == ours
    assert rows[3]["0.text.txt"] == "text 3" and rows[3]["1.raw.bin"] == b"\x03\x03"
    assert rows[3]["blocks.json"]["key"] == "k003"
