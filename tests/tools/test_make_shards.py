"""make_shards on a miniature copy of the corpora layout; the tokenizer; keys; --help examples."""

from __future__ import annotations

import json
import os

import pytest

from blocklm.formats import iter_dataset
from blocklm.tools.convert_keys import KeyAllocator, path_key
from blocklm.tools.make_shards import make_shards


@pytest.fixture
def mini_corpora(corpora, tmp_path):
    root = tmp_path / "corpora"
    for rel, names in (("images/bsd100", ["img_001.png", "img_002.png"]),
                       ("images/set14", ["img_003.png"]),
                       ("audio/fsdd", ["0_jackson_0.wav", "7_theo_3.wav", "9_nicolas_12.wav"])):
        (root / rel).mkdir(parents=True)
        for n in names:
            os.symlink(corpora / rel / n, root / rel / n)
    lines = (corpora / "text/tinyshakespeare.txt").read_text().splitlines(True)[:400]
    (root / "text").mkdir()
    (root / "text/tinyshakespeare.txt").write_text("".join(lines))
    return root


def test_make_shards_outputs_and_up_to_date_rerun(mini_corpora, tmp_path):
    out = tmp_path / "shards"
    logs: list[str] = []
    assert make_shards(mini_corpora, out, 1, 1 << 20, 600, log=logs.append) == 0
    for name in ("text", "images", "audio", "mixed", "mixed-val"):
        assert (out / name / "manifest.json").exists()
    assert (out / "tokenizer.model").exists() and (out / "tokenizer.vocab").exists()
    train = {s.key: s for s in iter_dataset(out / "mixed")}
    val = {s.key: s for s in iter_dataset(out / "mixed-val")}
    assert not set(train) & set(val)
    assert {"fsdd/0_jackson_0", "fsdd/7_theo_3"} <= set(val)  # FSDD's test split: index 0-4
    assert "fsdd/9_nicolas_12" in train
    texts = sorted(k for k in train | val if k.startswith("tinyshakespeare/"))
    n_val = len(texts) // 10
    assert n_val >= 1 and set(texts[len(texts) - n_val:]) <= set(val)  # the last 10%
    mixed = {**train, **val}
    seven = mixed["fsdd/7_theo_3"]
    assert seven.modes == ["audio", "text"] and seven.blocks[1].decode() == "seven"
    cap = mixed["set14/img_003"]
    assert cap.modes == ["image", "text"] and cap.blocks[1].decode() == "set14 img 003"
    assert cap.blocks[0].shape[2] == 1
    pair = mixed["tinyshakespeare/000000"]
    assert pair.modes == ["text", "text"]
    assert pair.blocks[0].decode().startswith("First Citizen:\nBefore we proceed")
    assert pair.blocks[1].decode() == "All:\nSpeak, speak."
    assert list(train)[:3] == ["bsd100/img_001", "tinyshakespeare/000000", "bsd100/img_002"]
    assert len({s.key for s in iter_dataset(out / "images")}) == 3

    logs.clear()
    make_shards(mini_corpora, out, 1, 1 << 20, 600, log=logs.append)
    assert all(line.endswith("up to date") for line in logs), logs
    with open(mini_corpora / "text/tinyshakespeare.txt", "a") as f:  # a changed input is redone
        f.write("\nEXTRA:\nOne more paragraph.\n\nAnd another.\n")
    logs.clear()
    make_shards(mini_corpora, out, 1, 1 << 20, 600, log=logs.append)
    assert [line.split(":")[0] for line in logs if "up to date" not in line] == \
        ["text", "mixed", "mixed-val", "tokenizer"]


def test_tokenizer_train_cli_is_deterministic(small_text, tmp_path, run_cli):
    from blocklm.tools.convert_options import ConvertOptions
    from blocklm.tools.convert_run import run_convert

    run_convert([str(small_text)], tmp_path / "ds", ConvertOptions(workers=1, quiet=True))
    models = []
    for i in range(2):
        res = run_cli("tokenizer", "train", tmp_path / "ds", "--out", tmp_path / f"t{i}/tok",
                      "--vocab-size", "400")
        assert res.exit_code == 0, res.output
        models.append((tmp_path / f"t{i}/tok.model").read_bytes())
    assert models[0] == models[1]
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "t0/tok.model"))
    ids = sp.encode("Before we proceed any further, hear me speak. \u2603")
    assert sp.decode(ids) == "Before we proceed any further, hear me speak. \u2603"


def test_keys_are_sanitised_shortened_and_unique():
    assert path_key("my data", "sub dir/a.b.png") == "my_data/sub_dir/a_b"
    long = path_key("x", "d/" + "n" * 100 + ".wav")
    assert len(long) == 64 and long.startswith("x/d/nnn") and long[-17] == "-"
    keys = KeyAllocator()
    a, b = keys.take("imgs/a", "imgs/a.png"), keys.take("imgs/a", "imgs/a.jpg")
    assert a == "imgs/a" and b.startswith("imgs/a-") and b != a
    assert keys.take("imgs/a", "imgs/a.jpg") not in (a, b)


@pytest.mark.parametrize("cmd", [["convert"], ["inspect"], ["verify"], ["ls"], ["cat"],
                                 ["tokenizer"], ["tokenizer", "train"], ["bench", "convert"]])
def test_every_command_help_has_an_example(cmd, run_cli):
    res = run_cli(*cmd, "--help")
    assert res.exit_code == 0 and "Example:" in res.stdout and "blocktool" in res.stdout


def test_report_json_is_valid(tmp_path, small_text, run_cli):
    assert run_cli("convert", small_text, "--out", tmp_path / "o", "-q").exit_code == 0
    rep = json.loads((tmp_path / "o/report.json").read_text())
    assert rep["complete"] and rep["inputs"] == rep["samples"] > 0 and rep["rejected"] == []


def test_progress_bar_on_a_terminal(monkeypatch):
    import io
    import sys

    from blocklm.tools.convert_progress import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(False, 0, 3)
    p.update(2_000_000)
    p.reject("x.png", "bad")
    p.update(1_000_000)
    p.close()
    out = err.getvalue()
    assert "3/3" in out and "MB/s" in out and "rejected: x.png: bad\n" in out
    err.truncate(0)
    Progress(True, 0, 3).close()  # --quiet: no bar
    assert err.getvalue() == ""


def test_long_names_that_hold_many_samples_get_valid_keys(tmp_path):
    from blocklm.tools.convert_options import ConvertOptions
    from blocklm.tools.convert_run import run_convert

    p = tmp_path / ("a_rather_long_file_name_for_a_text_corpus_" + "x" * 20 + ".txt")
    p.write_text("one\n\ntwo\n")
    rep = run_convert([str(p)], tmp_path / "o", ConvertOptions(workers=1, quiet=True))
    keys = [s.key for s in iter_dataset(tmp_path / "o")]
    assert rep.rejected == [] and len(keys) == 2 and len(set(keys)) == 2
    assert all(len(k) <= 64 for k in keys)
