"""End-to-end training on a small real dataset: loss goes down, resume is exact."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blocklm.formats import Sample, ShardWriter, audio_file_block, pcm_block, text_block
from blocklm.model.blocklm import BlockLM
from blocklm.tools.train.evaluate import evaluate, validation_source
from blocklm.tools.train.loop import RunSpec, load_model, train
from blocklm.tools.train.metrics import read_metrics

CORPORA = Path(__file__).resolve().parents[4] / "shared" / "corpora"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """Audio clips paired with their digit (audio + text) and text passages."""
    if not CORPORA.is_dir():
        pytest.skip("sample corpora not found")
    out = tmp_path_factory.mktemp("mixed")
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    wavs = sorted((CORPORA / "audio" / "fsdd").glob("*_jackson_1*.wav"))[:20]
    text = (CORPORA / "text" / "tinyshakespeare.txt").read_text()[:20000]
    with ShardWriter(out, max_samples=16) as w:
        for i, p in enumerate(wavs):
            clip = audio_file_block(p.read_bytes()).decode()[2000:2400]  # 50 ms: 100 steps
            audio = pcm_block(clip, 8000)
            digit = int(p.name.split("_")[0])
            w.write(Sample(f"a{i:03d}", [audio, text_block(names[digit])]))
        for i in range(20):
            w.write(Sample(f"t{i:03d}", [text_block(text[i * 80:i * 80 + 40]),
                                         text_block(text[i * 80 + 40:i * 80 + 80])]))
    return str(out)


def _spec(dataset, tokenizer, *extra) -> RunSpec:
    return RunSpec("tiny", [dataset], None, [
        f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=600",
        "train.log_every=1", "train.warmup=2", "dispatch.budget=256", "train.lr=0.01",
        *extra])


@pytest.mark.slow
def test_training_reduces_loss_and_resumes_exactly(tmp_path, dataset, tokenizer):
    full = train(tmp_path / "full", _spec(dataset, tokenizer), steps=12, progress=False,
                 tensorboard=False)
    assert full["stopped"] == "steps" and full["step"] == 12
    recs = read_metrics(tmp_path / "full")
    assert [r["step"] for r in recs] == list(range(1, 13))
    assert {m for r in recs for m in r["loss"]} == {"audio", "text"}
    # held-out style check on fixed data: the trained model beats its own initialisation
    trained, cfg, spec = load_model(tmp_path / "full")
    fresh = BlockLM(cfg.model)
    kw = dict(samples=40, config=cfg.dispatch, device=torch.device("cpu"))
    before = evaluate(fresh, validation_source(dataset, 0), **kw)
    after = evaluate(trained, validation_source(dataset, 0), **kw)
    assert before["samples"] == after["samples"] == 40
    for mode in ("audio", "text"):
        assert after["loss"][mode] < before["loss"][mode] - 0.2, (before, after)
    assert after["heads_bits"] < before["heads_bits"]
    assert 0.0 <= after["mode_accuracy"] <= 1.0 and 0.0 <= after["shape_accuracy"] <= 1.0
    from click.testing import CliRunner

    from blocklm.tools.cli import main
    res = CliRunner().invoke(main, ["eval", str(tmp_path / "full"), "--data", dataset,
                                    "--samples", "40", "--baseline-samples", "40", "--json",
                                    "--key-prefix", "a"])
    assert res.exit_code == 0, res.output
    ev = json.loads(res.output)
    assert ev["samples"] == 20 and set(ev["unigram"]) == {"audio", "text"}
    assert ev["loss"]["audio"] == pytest.approx(after["loss"]["audio"], rel=0.2)

    half = tmp_path / "half"
    train(half, _spec(dataset, tokenizer), steps=7, progress=False, tensorboard=False)
    assert read_metrics(half)[-1]["epoch"] >= 1  # the resume point lies past the first epoch
    train(half, steps=12, resume=True, progress=False, tensorboard=False)
    resumed = read_metrics(half)
    assert [r["step"] for r in resumed] == list(range(1, 13))
    for a, b in zip(recs, resumed):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6), a["step"]
    assert json.loads((half / "run.json").read_text())["preset"] == "tiny"


def test_new_run_refuses_a_used_folder(tmp_path, dataset, tokenizer):
    (tmp_path / "checkpoint.pt").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(tmp_path, _spec(dataset, tokenizer), steps=1, progress=False, tensorboard=False)
    with pytest.raises(FileNotFoundError, match="no run.json"):
        train(tmp_path / "none", steps=1, resume=True, progress=False, tensorboard=False)


@pytest.mark.slow
def test_training_streams_from_nginx_and_s3(tmp_path, dataset, tokenizer, nginx, s3):
    shutil.copytree(dataset, nginx.root / "train-mixed")
    url = s3.upload(Path(dataset), "train", "mixed")
    for name, src, remote in [("http", nginx.url + "/train-mixed", None),
                              ("s3", url, s3.config())]:
        summary = train(tmp_path / name, _spec(src, tokenizer), steps=2, remote=remote,
                        progress=False, tensorboard=False)
        assert summary["step"] == 2 and summary["loss"], name


@pytest.mark.slow
def test_sigint_writes_a_usable_checkpoint(tmp_path, dataset, tokenizer):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "blocklm.tools.cli", "train", "--preset", "tiny", "--data",
            dataset, "--out", str(run), "--steps", "100000", "--quiet"]
    for o in _spec(dataset, tokenizer).overrides:
        args += ["--set", o]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (signal)" in err
    stopped_at = json.loads((run / "summary.json").read_text())["step"]
    assert stopped_at >= 2
    summary = train(run, steps=stopped_at + 1, resume=True, progress=False, tensorboard=False)
    assert summary["step"] == stopped_at + 1


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tmp_path, dataset, tokenizer):
    """With one optimizer step per epoch (a window as large as the data: one dispatcher run
    per epoch, not chained), 2 ranks see the same global batch as 1 process: the losses must
    agree. Ranks hold different modes at the same dispatcher step, so this also shows that
    uneven modes do not hang."""
    extra = ["train.tokens_per_step=1000000000", "train.warmup=1", "train.chain_epochs=false"]
    base = ["-m", "blocklm.tools.cli", "train", "--preset", "tiny", "--data", dataset,
            "--steps", "2", "--quiet"]
    for o in _spec(dataset, tokenizer, *extra).overrides:
        base += ["--set", o]
    one = subprocess.run([sys.executable, *base, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    port = str(29500 + (os.getpid() % 1000))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_addr", "127.0.0.1", "--master_port", port, *base,
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        assert ra["loss"].keys() == rb["loss"].keys() == {"audio", "text"}
        for m in ra["loss"]:
            assert ra["loss"][m] == pytest.approx(rb["loss"][m], rel=1e-4), (m, ra, rb)
    assert (tmp_path / "two" / "rank-1.pt").is_file()


def test_unigram_baseline_matches_hand_computation(tokenizer):
    from blocklm.formats import raw_image_block
    from blocklm.model.presets import tiny
    from blocklm.tools.train.baseline import unigram_bits, unigram_counts

    torch.manual_seed(0)
    model = BlockLM(tiny(tokenizer_path=tokenizer))
    px = np.zeros((2, 2, 1), np.uint8)
    px[0, 0, 0] = 255  # sub-pixels: three 0s and one 255
    counts = unigram_counts(model, [Sample("i", [raw_image_block(px)])])
    c, elems = counts["image"]
    assert elems == 4 and c[0] == 3 and c[255] == 1 and c.sum() == 4
    # fit on the same data, add-one smoothed over 256 values: p(0) = 4/260, p(255) = 2/260
    want = -(3 * math.log2(4 / 260) + math.log2(2 / 260)) / 4
    assert unigram_bits(counts, counts)["image"] == pytest.approx(want)


def test_window_bits_are_read_after_backward_is_queued(tmp_path, dataset, tokenizer,
                                                       monkeypatch):
    """The optimizer step normalises by host counts and reads the window's bits (a GPU wait,
    for the log) only after backward: read first, the host waited for the whole forward
    before it could launch the backward. Every step: backward, then one read."""
    from blocklm.tools.train import runner

    events: list[str] = []
    read, backward = runner.Window.bit_sums_tensor, torch.autograd.backward
    monkeypatch.setattr(runner.Window, "bit_sums_tensor",
                        lambda self, modes: events.append("read") or read(self, modes))
    monkeypatch.setattr(torch.autograd, "backward",
                        lambda *a, **k: events.append("backward") or backward(*a, **k))
    out = train(tmp_path / "run", _spec(dataset, tokenizer), steps=2, progress=False,
                tensorboard=False)
    assert out["step"] == 2 and math.isfinite(out["loss"]["text"])
    assert events == ["backward", "read"] * 2


@pytest.mark.parametrize("extra", [(), ("train.checkpoint_every=2",)])
def test_async_log_writes_the_same_records_a_step_later(tmp_path, dataset, tokenizer, extra):
    """train.async_log (on by default on CUDA): each step's figures are read from the device a
    step late (tools/train/step_log.py). The records are those of the synchronous log; during
    the run the log holds every step but the last (a checkpoint flushes it), and fit writes
    that one at its end."""
    from blocklm.tools.train.loop import Trainer

    seen: list[tuple[int, int]] = []  # (step, records in the log) after each optimizer step
    runs = {}
    for lag in (False, True):
        tr = Trainer(tmp_path / str(lag), _spec(dataset, tokenizer, f"train.async_log={lag}",
                                                *extra), resume=False, remote=None, progress=False,
                     tensorboard=False)
        step, ck = tr.optimizer_step, tr.checkpoint

        def counted(step=step, tr=tr, lag=lag):
            step()
            if lag:
                seen.append((tr.step, len(read_metrics(tr.run))))

        def checkpoint(ck=ck, tr=tr, lag=lag):
            ck()
            if lag:
                seen.append((-tr.step, len(read_metrics(tr.run))))
        tr.optimizer_step, tr.checkpoint = counted, checkpoint
        runs[lag] = (tr.fit(steps=5, minutes=None), read_metrics(tr.run))
    (s0, r0), (s1, r1) = runs[False], runs[True]
    drop = {"tokens_per_s"}  # wall-clock figures
    assert [{k: v for k, v in r.items() if k not in drop} for r in r1] == \
           [{k: v for k, v in r.items() if k not in drop} for r in r0]
    assert [r["step"] for r in r1] == [1, 2, 3, 4, 5]
    assert {k: v for k, v in s1.items() if k not in drop} == \
           {k: v for k, v in s0.items() if k not in drop}
    steps = [x for x in seen if x[0] > 0]
    assert steps == [(1, 0), (2, 1), (3, 2), (4, 3), (5, 4)]
    if extra:  # the checkpoints at steps 2 and 4 (and at the end) flushed their step's record
        assert [x for x in seen if x[0] < 0][:2] == [(-2, 2), (-4, 4)]


def test_trainer_tokenizes_text_in_the_read_ahead(tmp_path, dataset, tokenizer):
    """The trainer's dispatcher prepares each block through its mode support, so text reaches
    the runners tokenized (made in the read-ahead thread), audio decoded as it is."""
    from blocklm.model.text import Tokenized
    from blocklm.tools.train.loop import Trainer

    tr = Trainer(tmp_path / "run", _spec(dataset, tokenizer), resume=False, remote=None,
                 progress=False, tensorboard=False)
    seen: dict[str, set] = {}
    run = tr.runners.run

    def spy(mode, batch):
        seen.setdefault(mode, set()).update(type(r.inputs) for r in batch.requests)
        return run(mode, batch)
    tr.runners.run = spy
    tr.fit(steps=1, minutes=None)
    assert seen["text"] == {Tokenized}
    assert seen["audio"] and Tokenized not in seen["audio"]
