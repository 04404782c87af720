"""inspect (text, JSON, HTML, --sample), verify, ls and cat on datasets converted from the corpora."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from blocklm.tools.convert_options import ConvertOptions
from blocklm.tools.convert_run import run_convert


@pytest.fixture(scope="module")
def bsd100(corpora, tmp_path_factory):
    """All of BSD100 (77 landscape, 23 portrait photos) in 3 shards."""
    out = tmp_path_factory.mktemp("bsd") / "ds"
    run_convert([str(corpora / "images/bsd100")], out,
                ConvertOptions(workers=2, shard_samples=40, quiet=True))
    return out


@pytest.fixture
def pairs(audio_dir, small_text, tmp_path):
    """Audio + text pairs and text passages, 2 samples per shard."""
    man = tmp_path / "pairs.jsonl"
    man.write_text("".join(json.dumps([{"mode": "audio", "path": f"fsdd/{p.name}"},
                                       {"mode": "text", "text": p.name[0]}]) + "\n"
                           for p in sorted(audio_dir.iterdir())))
    out = tmp_path / "ds"
    run_convert([str(man), str(small_text)], out,
                ConvertOptions(workers=1, shard_samples=2, quiet=True))
    return out


def test_inspect_json_known_counts(bsd100, run_cli):
    res = run_cli("inspect", bsd100, "--json")
    assert res.exit_code == 0
    s = json.loads(res.stdout)
    assert (s["samples"], s["shards"], s["blocks"], s["codecs"]) == \
        (100, 3, {"image": 100}, {"image": {"png": 100}})
    assert s["bytes"] == sum(p.stat().st_size for p in bsd100.glob("*.tar"))
    img = s["shapes"]["image"]
    assert img["dim_names"] == ["H", "W", "C"]
    assert dict(map(tuple, img["top"])) == {"320 x 480 x 3": 77, "480 x 320 x 3": 23}
    assert [(d["min"], d["max"]) for d in img["dims"]] == [(320, 480), (320, 480), (3, 3)]
    assert sum(img["histogram"]["counts"]) == 100


def test_inspect_text_and_sample(pairs, run_cli):
    res = run_cli("inspect", pairs)
    assert res.exit_code == 0 and "audio + text (5)" in res.stdout
    assert "seconds min/median/max" in res.stdout
    res = run_cli("inspect", pairs, "--sample", "pairs/000001")
    assert "block 0: audio" in res.stdout and "block 1: text 1 utf8" in res.stdout
    assert run_cli("inspect", pairs, "--sample", "nope").exit_code == 1


def test_html_report_contains_the_pictures(bsd100, pairs, tmp_path, run_cli):
    page = tmp_path / "r.html"
    assert run_cli("inspect", bsd100, "--html", page).exit_code == 0
    html = page.read_text()
    assert html.count("<img src='data:image/jpeg;base64,") == 24 and "<svg" in html
    assert "src='http" not in html  # self-contained
    assert run_cli("inspect", pairs, "--html", page).exit_code == 0
    html = page.read_text()
    assert html.count("<path d=") == 5  # one waveform per clip
    assert "First Citizen:" in html


def test_verify_clean_then_catches_a_corrupted_copy(pairs, tmp_path, run_cli):
    assert run_cli("verify", pairs).exit_code == 0
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    from blocklm.formats import load_index

    entry = load_index(str(bad / "shard-000001.tar")).samples[0]
    with open(bad / "shard-000001.tar", "r+b") as f:
        f.seek(entry.blocks[0].offset + 100)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    res = run_cli("verify", bad, "-j", "2")
    assert res.exit_code == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    shard, key, block, reason = lines[0].split("\t")
    assert shard.endswith("shard-000001.tar") and key == entry.key and block == "block 0"
    assert "checksum" in reason


def test_verify_reports_a_missing_shard(pairs, tmp_path, run_cli):
    bad = tmp_path / "bad"
    shutil.copytree(pairs, bad)
    (bad / "shard-000002.tar").unlink()
    res = run_cli("verify", bad)
    assert res.exit_code == 1 and "shard-000002.tar" in res.stdout


def test_ls_and_cat(pairs, audio_dir, tmp_path, run_cli):
    res = run_cli("ls", pairs, "-n", "2")
    first = sorted(audio_dir.iterdir())[0]
    assert res.stdout.splitlines() == [
        f"pairs/000001\taudio[{_frames(first)}x1] text[1]",
        f"pairs/000002\taudio[{_frames(sorted(audio_dir.iterdir())[1])}x1] text[1]"]
    res = run_cli("cat", pairs, "pairs/000001", "--out", tmp_path / "c")
    assert res.exit_code == 0
    files = sorted((tmp_path / "c").iterdir())
    assert [f.name for f in files] == ["pairs__000001.0.audio.wav", "pairs__000001.1.text.txt"]
    assert files[0].read_bytes() == first.read_bytes() and files[1].read_text() == "0"
    assert run_cli("cat", pairs, "missing", "--out", tmp_path / "c").exit_code == 1


def _frames(path) -> int:
    import soundfile as sf

    return sf.info(str(path)).frames


def test_cat_image_is_the_original_file(bsd100, corpora, tmp_path, run_cli):
    res = run_cli("cat", bsd100, "bsd100/img_007", "-o", tmp_path)
    assert res.stdout.strip().endswith("bsd100__img_007.0.image.png")
    assert (tmp_path / "bsd100__img_007.0.image.png").read_bytes() == \
        (corpora / "images/bsd100/img_007.png").read_bytes()


def test_single_tar_paths(pairs, run_cli):
    tar = pairs / "shard-000000.tar"
    assert run_cli("verify", tar).exit_code == 0
    assert len(run_cli("ls", tar).stdout.splitlines()) == 2
    s = json.loads(run_cli("inspect", tar, "--json").stdout)
    assert s["samples"] == 2 and s["shards"] == 1


def test_verify_without_the_audio_decoder_is_one_clear_error(pairs, monkeypatch, run_cli):
    # a machine whose soundfile cannot load: one `error:` line naming the package, exit 1, not a
    # traceback nor one problem line per audio block. (These clips are plain 16-bit PCM, which
    # decodes without soundfile: the test takes that path away, as for any other audio codec.)
    from blocklm.formats import codecs

    monkeypatch.setattr(codecs, "pcm16_samples", lambda data: None)
    monkeypatch.setitem(sys.modules, "soundfile", None)
    res = run_cli("verify", pairs, "-j", "1")
    assert res.exit_code == 1
    assert res.stderr.startswith("error: ") and "soundfile" in res.stderr
    assert res.stdout == ""
