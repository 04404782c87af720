"""The chained trainer's admission from examples built ahead (``pipeline/dispatch_admit.py``,
``dispatch.admission`` "inline", the default, and "prefetch"): a real chained run forms exactly
the batches of one-by-one admission ("one_by_one"), on text and on mixed text and image shards
with rejected (oversize) samples in the stream, and a run resumed from a checkpoint mid-run
continues with the uninterrupted run's batches."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from blocklm.formats import Sample, ShardWriter, raw_image_block, text_block
from blocklm.tools.train.loop import RunSpec, Trainer

WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings hum".split()


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    """``text``: 30 samples (every third of two blocks); ``mixed``: 30 samples of text and raw
    images, every seventh image too large for the budget without a splitter (rejected)."""
    out = tmp_path_factory.mktemp("admit")
    rng = np.random.default_rng(0)
    with ShardWriter(out / "text", max_samples=8) as w:
        for i in range(30):
            t = " ".join(WORDS[i % 7:i % 7 + 2 + i % 6])
            more = [text_block(t[::-1] + " and more")] if i % 3 == 0 else []
            w.write(Sample(f"t{i:03d}", [text_block(t)] + more))
    with ShardWriter(out / "mixed", max_samples=8) as w:
        for i in range(30):
            hw = (96, 96) if i % 7 == 3 else (8 * (1 + i % 3), 8 * (1 + i % 2))  # 96x96: 144
            img = raw_image_block(rng.integers(0, 255, (*hw, 3), np.uint8))  # patches > 100
            blocks = [text_block(" ".join(WORDS[i % 5:i % 5 + 2])), img][::1 if i % 2 else -1]
            w.write(Sample(f"m{i:03d}", blocks))
    return {"text": str(out / "text"), "mixed": str(out / "mixed")}


def _spec(data: str, tokenizer: str, mode: str) -> RunSpec:
    # 12 in flight and 8 read ahead in chunks of 3 (a chunk is often admitted in part) of
    # 30-sample epochs: epochs' tails and heads share batches
    return RunSpec("tiny", [data], None, [
        f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=150",
        "dispatch.budget=100", "dispatch.max_in_flight=12", "dispatch.prefetch=8",
        "dispatch.prefetch_chunk=3", "train.log_every=1", "train.warmup=2", "train.lr=0.01",
        "train.checkpoint_every=0", "train.chain_epochs=true", f"dispatch.admission={mode}"])


def _batches(run, spec: RunSpec | None, steps: int) -> tuple[list[str], dict]:
    """A digest of every batch a (new, or with ``spec=None`` resumed) run forms: its mode,
    reason, padded shape and each request's position, key, block, shape, time and sequence
    number; and the dispatcher's counts."""
    tr = Trainer(run, spec, resume=spec is None, remote=None, progress=False, tensorboard=False)
    digests, run_batch = [], tr.runners.run

    def on_run(mode, batch):
        rows = [(r.example, r.key, r.block, r.part, r.shape, r.t, r.seq) for r in batch.requests]
        digests.append(hashlib.sha1(repr((mode, batch.reason, batch.padded_shape,
                                          rows)).encode()).hexdigest()[:16])
        return run_batch(mode, batch)
    tr.runners.run = on_run
    tr.fit(steps=steps, minutes=None)
    return digests, dict(tr.disp.counts)


@pytest.mark.slow  # ten short CPU trainings: ~15 s on a busy 2-core machine
@pytest.mark.parametrize("data", ["text", "mixed"])
def test_chained_runs_form_the_batches_of_one_by_one_admission_and_resume_exactly(
        tmp_path, shards, tokenizer, data):
    # 18 steps: as many batches and epochs as 8 were at the characters' estimate (the texts'
    # exact tokens, train.cost_from_content, make fewer, larger batches)
    old, old_counts = _batches(tmp_path / "old", _spec(shards[data], tokenizer, "one_by_one"),
                               18)
    new, counts = _batches(tmp_path / "new", _spec(shards[data], tokenizer, "inline"), 18)
    assert new == old and counts == old_counts
    assert _batches(tmp_path / "pre", _spec(shards[data], tokenizer, "prefetch"), 18)[0] == old
    assert len(new) > 40 and counts["admitted"] > 60  # more than two epochs went through
    if data == "mixed":
        assert counts["rejected_OversizeBlockError"] >= 2
    head, _ = _batches(tmp_path / "half", _spec(shards[data], tokenizer, "inline"), 3)
    tail, _ = _batches(tmp_path / "half", None, 18)  # resumed from the checkpoint
    assert head + tail == new
