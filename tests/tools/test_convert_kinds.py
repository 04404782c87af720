"""Each input kind converts real corpus files into the samples, keys and shapes expected."""

from __future__ import annotations

import json

import numpy as np
import pytest

from blocklm.formats import iter_dataset
from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import run_convert


def convert(inputs, out, **kw):
    rep = run_convert([str(p) for p in inputs], out, ConvertOptions(workers=1, quiet=True, **kw))
    return rep, {s.key: s for s in iter_dataset(out)}


def test_image_folder(image_dir, tmp_path):
    rep, samples = convert([image_dir], tmp_path / "out")
    assert rep.inputs == rep.samples == 4 and rep.rejected == []
    assert sorted(samples) == ["imgs/grey", "imgs/img_001", "imgs/img_002", "imgs/img_003"]
    grey = samples["imgs/grey"].blocks[0]
    assert grey.mode == "image" and grey.codec == "png" and grey.shape == (512, 512, 1)
    photo = samples["imgs/img_001"].blocks[0]
    assert photo.shape[2] == 3 and photo.payload == (image_dir / "img_001.png").read_bytes()


def test_audio_folder(audio_dir, tmp_path):
    rep, samples = convert([audio_dir], tmp_path / "out")
    assert rep.samples == 5
    for key, s in samples.items():
        b = s.blocks[0]
        name = key.split("/")[1] + ".wav"
        assert b.mode == "audio" and b.codec == "wav" and b.shape[1] == 1
        assert b.meta["sample_rate"] == 8000 and b.payload == (audio_dir / name).read_bytes()
        assert b.decode().shape == b.shape


@pytest.mark.parametrize("split, expect", [("lines", None), ("paragraphs", None),
                                           ("chars:100", None)])
def test_text_splits(small_text, tmp_path, split, expect):
    text = small_text.read_text(encoding="utf-8")
    rep, samples = convert([small_text], tmp_path / "out", text_split=split)
    passages = [samples[k].blocks[0].decode() for k in sorted(samples)]
    if split == "lines":
        assert passages == [ln for ln in text.splitlines() if ln.strip()]
    elif split == "paragraphs":
        assert len(passages) == text.count("\n\n") + (not text.endswith("\n\n"))
        assert passages[0] == "First Citizen:\nBefore we proceed any further, hear me speak."
    else:
        assert "".join(passages) == text and {len(p) for p in passages[:-1]} == {100}
    assert sorted(samples)[0] == "shakes/000000"


def test_jsonl_text(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text('{"text": "hello"}\n\n{"text": "world", "id": 3}\n', encoding="utf-8")
    rep, samples = convert([p], tmp_path / "out")
    assert {k: s.blocks[0].decode() for k, s in samples.items()} == {"t/000001": "hello",
                                                                     "t/000003": "world"}


def test_sample_manifest_pairs(audio_dir, image_dir, tmp_path):
    wav = sorted(audio_dir.iterdir())[0]
    man = tmp_path / "pairs.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in [
        [{"mode": "audio", "path": f"fsdd/{wav.name}"}, {"mode": "text", "text": "zero"}],
        {"key": "cap/one", "blocks": [{"mode": "image", "path": "imgs/img_001.png"},
                                      {"mode": "text", "text": "a photo", "meta": {"src": "x"}}]},
    ]) + "\n")
    rep, samples = convert([man], tmp_path / "out")
    assert rep.samples == 2 and rep.rejected == []
    a = samples["pairs/000001"]
    assert a.modes == ["audio", "text"] and a.blocks[1].decode() == "zero"
    b = samples["cap/one"]
    assert b.modes == ["image", "text"] and b.blocks[0].shape in [(320, 480, 3), (480, 320, 3)]
    assert b.blocks[1].meta == {"src": "x"}


def test_webdataset_tar(image_dir, audio_dir, tmp_path):
    import webdataset as wds

    tar = tmp_path / "wds.tar"
    wav = sorted(audio_dir.iterdir())[0]
    with wds.TarWriter(str(tar)) as w:
        w.write({"__key__": "s0", "png": (image_dir / "img_001.png").read_bytes(), "txt": "cap"})
        w.write({"__key__": "s1", "wav": wav.read_bytes(), "json": {"digit": 0}})
    rep, samples = convert([tar], tmp_path / "out")
    assert rep.samples == 2
    s0, s1 = samples["wds/s0"], samples["wds/s1"]
    assert sorted(s0.modes) == ["image", "text"] and sorted(s1.modes) == ["audio", "text"]
    texts = {b.meta["ext"]: b.decode() for b in s0.blocks + s1.blocks if b.mode == "text"}
    assert texts["txt"] == "cap" and json.loads(texts["json"]) == {"digit": 0}


def test_hf_dataset_and_parquet(image_dir, audio_dir, tmp_path):
    import datasets

    imgs = sorted(str(p) for p in image_dir.iterdir())[:2]
    wavs = sorted(str(p) for p in audio_dir.iterdir())[:2]
    ds = datasets.Dataset.from_dict({"image": imgs, "audio": wavs, "caption": ["a", "b"],
                                     "label": [1, 2]})
    ds = ds.cast_column("image", datasets.Image()).cast_column("audio", datasets.Audio())
    ds.save_to_disk(str(tmp_path / "hf"))
    ds.to_parquet(str(tmp_path / "hf.parquet"))
    for src in (tmp_path / "hf", tmp_path / "hf.parquet"):
        rep, samples = convert([src], tmp_path / f"out-{src.name}")
        assert rep.samples == 2 and rep.rejected == [], rep.rejected
        assert any("label" in s for s in rep.skipped)
        s = samples[sorted(samples)[0]]
        assert s.modes == ["image", "audio", "text"]
        assert s.blocks[0].payload == open(imgs[0], "rb").read()
        assert s.blocks[2].decode() == "a" and s.blocks[2].meta == {"column": "caption"}


def test_mixed_folder_detects_each_file(image_dir, small_text, tmp_path):
    (image_dir / "notes.txt").write_text("one\n\ntwo\n")
    rep, samples = convert([image_dir], tmp_path / "out")
    assert rep.samples == 6 and samples["imgs/notes/000001"].blocks[0].decode() == "two"


def test_channels_and_bit_depth_are_kept(tmp_path):
    from PIL import Image

    d = tmp_path / "synth"
    d.mkdir()
    Image.fromarray(np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000).save(d / "g16.png")
    Image.fromarray(np.zeros((4, 5, 4), np.uint8), "RGBA").save(d / "rgba.png")
    Image.fromarray(np.zeros((6, 7, 3), np.uint8)).convert("P").save(d / "pal.png")
    frames = [Image.new("RGB", (9, 3), c) for c in ("red", "blue")]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:])
    import soundfile as sf

    sf.write(d / "stereo.flac", np.zeros((100, 2), np.int16), 16000, subtype="PCM_24")
    rep, samples = convert([d], tmp_path / "out")
    assert rep.rejected == []
    b = {k.split("/")[1]: s.blocks[0] for k, s in samples.items()}
    assert b["g16"].shape == (8, 8, 1) and b["g16"].meta["bit_depth"] == 16
    assert b["g16"].decode().dtype == np.uint16
    assert b["rgba"].shape == (4, 5, 4) and b["pal"].shape == (6, 7, 3)
    assert b["pal"].meta["pil_mode"] == "P"
    assert b["anim"].meta["frames"] == 2 and b["anim"].shape == (3, 9, 3)  # first frame
    assert b["stereo"].shape == (100, 2) and b["stereo"].meta["subtype"] == "PCM_24"


@pytest.mark.parametrize("seg", ["", "a", "a-b_C9", "a b", "a.b", "\u00fc", "\u0663", "\u00b2",
                                 "a\u0301", "-", "_", "x" * 70, "\u01c5", "tab\there"])
def test_sanitize_fast_path_equals_the_regex(seg):
    """sanitize_segment returns names of key characters unchanged without the substitution,
    and is the substitution for every other name (Unicode letters and digits included)."""
    import re

    from blocklm.tools.convert_keys import sanitize_segment

    assert sanitize_segment(seg) == (re.sub(r"[^A-Za-z0-9_\-]", "_", seg) or "_")


def test_folder_walk_keys_for_odd_names(tmp_path):
    """The walk's inlined key making: extensions, dots, hidden names, clashes, long names."""
    from blocklm.tools.convert_keys import KeyAllocator, path_key
    from blocklm.tools.convert_sources import iter_input

    d = tmp_path / "in put"
    (d / "sub.dir").mkdir(parents=True)
    names = ["a.png", "a.jpg", "c.", "x.y.z.wav", "\u00fc.wav", "sp ace.png", "n" * 80 + ".wav",
             "A-b_C.WAV", "sub.dir/q.flac", ".hidden.wav", "noext"]
    for n in names:
        (d / n).write_bytes(b"x")
    skipped: list[str] = []
    items = list(iter_input(str(d), ConvertOptions(), KeyAllocator(), skipped))
    ref, keys = {}, KeyAllocator()
    for n in sorted(n for n in names if not n.startswith(".")):
        ref[str(d / n)] = keys.take(path_key("in_put", n), str(d / n))
    got = {it.source: it.key for it in items if it.error is None}
    unknown = {str(d / n) for n in ("c.", "noext")}  # no known extension: rejected, no key
    assert {it.source for it in items if it.error} == unknown
    assert got == {k: v for k, v in ref.items() if k not in unknown}
    assert got[str(d / "a.jpg")] == "in_put/a" and got[str(d / "a.png")].startswith("in_put/a-")
    assert len(got[str(d / ("n" * 80 + ".wav"))]) == 64
    assert skipped == [str(d / ".hidden.wav")]
