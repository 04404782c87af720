"""Shared fixtures for the tools tests: small subsets of the real corpora, linked into tmp_path,
and a small sentencepiece tokenizer (training tests, bench train's simulation)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _subset(corpora: Path, dst: Path, rel: str, names: list[str]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for n in names:
        os.symlink(corpora / rel / n, dst / n)
    return dst


@pytest.fixture
def image_dir(corpora, tmp_path) -> Path:
    """3 BSD100 photos (RGB) and Set14's greyscale image (img_003)."""
    d = _subset(corpora, tmp_path / "imgs", "images/bsd100", ["img_001.png", "img_002.png",
                                                             "img_003.png"])
    os.symlink(corpora / "images/set14/img_003.png", d / "grey.png")
    return d


@pytest.fixture
def audio_dir(corpora, tmp_path) -> Path:
    """5 FSDD clips."""
    names = sorted(os.listdir(corpora / "audio/fsdd"))[:5]
    return _subset(corpora, tmp_path / "fsdd", "audio/fsdd", names)


@pytest.fixture
def small_text(corpora, tmp_path) -> Path:
    """The first 60 lines of tinyshakespeare."""
    lines = (corpora / "text/tinyshakespeare.txt").read_text(encoding="utf-8").splitlines(True)
    p = tmp_path / "shakes.txt"
    p.write_text("".join(lines[:60]), encoding="utf-8")
    return p


@pytest.fixture
def run_cli():
    """Invoke ``blocktool`` in-process; returns the click Result (stdout and stderr split)."""
    from click.testing import CliRunner

    from blocklm.tools.cli import main

    def run(*args: str):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    return run


CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"
FALLBACK = "First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> str:
    """A 400-piece byte-fallback BPE model trained on a slice of tinyshakespeare."""
    import sentencepiece as spm

    path = CORPORA / "text" / "tinyshakespeare.txt"
    text = path.read_text()[:40000] if path.is_file() else FALLBACK * 400
    prefix = tmp_path_factory.mktemp("spm") / "tok"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(text.splitlines()), model_prefix=str(prefix), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0,
        hard_vocab_limit=False, minloglevel=2)  # the fallback text holds fewer than 400 pieces
    return str(prefix) + ".model"


@pytest.fixture
def trainer_batches():
    """``batches(run_dir, data, overrides, steps) -> (batches, epoch)``: a tiny trainer's
    batches over ``steps`` optimizer steps, each as (mode, its requests' sample keys), in the
    order they ran (to set beside ``simulate_dispatch``'s trace), and the epoch it ended in."""
    from blocklm.tools.train.loop import RunSpec, Trainer

    def batches(run_dir: Path, data: str, overrides: list[str], steps: int) -> tuple[list, int]:
        tr = Trainer(run_dir, RunSpec("tiny", [data], overrides=overrides), resume=False,
                     remote=None, progress=False, tensorboard=False)
        got: list = []
        run = tr.runners.run
        tr.runners.run = lambda mode, batch: got.append(
            (mode, [r.key for r in batch.requests])) or run(mode, batch)
        tr.fit(steps=steps, minutes=None)
        return got, tr.epoch
    return batches


@pytest.fixture
def tiny_bench(tmp_path, tokenizer):
    """``run(*args) -> (click result, the run's JSON row)``: ``bench train`` with the tiny
    preset on 40 text-only samples (warm-up 1 step), with ``args`` added to its command line."""
    import json

    from click.testing import CliRunner

    from blocklm.formats import Sample, ShardWriter, text_block
    from blocklm.tools.bench_train import bench_train
    from blocklm.tools.bench_turnover import TINY

    data = tmp_path / "tiny_bench_data"
    with ShardWriter(data, max_samples=64) as w:
        for i in range(40):
            w.write(Sample(f"s{i:03d}", [text_block("to be or not to be, " * (1 + i % 5))]))
    sets = [a for o in TINY if "log_every" not in o for a in ("--set", o)]
    out = tmp_path / "tiny_bench.json"

    def run(*args: str):
        r = CliRunner().invoke(bench_train, [
            "--preset", "tiny", "--data", str(data), "--variants", "off", "--warmup", "1",
            "--out", str(out), *sets, "--set", f"model.modes.text.tokenizer_path={tokenizer}",
            *args])
        assert r.exit_code == 0, r.output
        return r, json.loads(out.read_text())[0]
    return run
