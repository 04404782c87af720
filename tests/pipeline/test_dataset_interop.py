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


@pytest.fixture(scope="module")
def mixed_shards(tmp_path_factory):
    """Samples of three layouts interleaved, with both raw and zstd-stored text members."""
    pil = pytest.importorskip("PIL.Image")
    import io

    from blocklm.formats import image_file_block

    def png(i: int) -> bytes:
        out = io.BytesIO()
        pil.new("RGB", (4 + i, 3), (i, 2 * i, 3 * i)).save(out, format="PNG")
        return out.getvalue()

    out = tmp_path_factory.mktemp("mixed") / "ds"
    with ShardWriter(out, max_samples=7) as w:
        for i in range(18):
            long = f"sample {i} " + "la " * 200 * (i % 2)  # odd samples: stored as .txt.zst
            if i % 3 == 0:
                blocks = [text_block(long)]
            elif i % 3 == 1:
                blocks = [image_file_block(png(i)), text_block(long)]
            else:
                blocks = [bytes_block("raw", (3,), bytes([i, i, i])), text_block(long)]
            w.write(Sample(f"m/{i:03d}", blocks))
    return out


def test_hf_datasets_reads_a_mixed_dataset_with_hf_features(mixed_shards, tmp_path):
    datasets = pytest.importorskip("datasets")
    from blocklm.pipeline.hf import hf_columns, hf_data_files, hf_features

    files = {"train": hf_data_files(mixed_shards)}
    # left to infer its columns, the builder refuses samples with different member names
    with pytest.raises(ValueError, match="same prefix or the same types"):
        list(datasets.load_dataset("webdataset", data_files=files, split="train",
                                   streaming=True))
    assert set(hf_columns(mixed_shards)) == {"blocks.json", "0.text.txt", "0.text.txt.zst",
                                             "0.image.png", "1.text.txt", "1.text.txt.zst",
                                             "0.raw.bin"}
    ours = list(BlockDataset(mixed_shards, shuffle=False))
    feats = hf_features(mixed_shards)
    for streaming in (True, False):
        rows = list(datasets.load_dataset("webdataset", data_files=files, split="train",
                                          features=feats, streaming=streaming,
                                          cache_dir=str(tmp_path / "hf")))
        assert [r["__key__"] for r in rows] == [s.key for s in ours]
        for r, s in zip(rows, ours):
            assert r["blocks.json"]["key"] == s.key
            got = {k: v for k, v in r.items() if v is not None and not k.startswith("__")}
            assert len(got) == 1 + len(s.blocks)  # its own members, None elsewhere
            text = s.blocks[-1].decode()
            assert text in (got.get("0.text.txt"), got.get("0.text.txt.zst"),
                            got.get("1.text.txt"), got.get("1.text.txt.zst"))
            if s.blocks[0].mode == "raw":
                assert got["0.raw.bin"] == s.blocks[0].payload
            if s.blocks[0].mode == "image":
                assert got["0.image.png"].size == tuple(s.blocks[0].shape[1::-1])
