"""bench train --simulate: the per-mode breakdown, chained epochs, and that it forms the
trainer's own batches; the command's closing table (a short CPU run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from blocklm.formats import Sample, ShardWriter, text_block
from blocklm.tools.bench_train import simulate_dispatch


def _dataset(out: Path, n: int) -> str:
    with ShardWriter(out, max_samples=100) as w:
        for i in range(n):  # two text blocks each: the second queues after the first runs
            w.write(Sample(f"k{i:04d}", [text_block("x" * (1 + i % 97)),
                                         text_block("y" * (1 + (7 * i) % 89))]))
    return str(out)


def test_simulate_reports_modes_and_chained_epochs(tmp_path, tokenizer):
    out = _dataset(tmp_path / "ds", 300)
    # the test's own tokenizer: a clean checkout has no data/shards/tokenizer.model
    sets = [f"model.modes.text.tokenizer_path={tokenizer}", "dispatch.max_in_flight=4096",
            "dispatch.prefetch=0"]
    one = simulate_dispatch("tiny", out, sets + ["train.chain_epochs=false"])
    off = simulate_dispatch("tiny", out, sets + ["train.chain_epochs=false"], epochs=2)
    on = simulate_dispatch("tiny", out, sets + ["train.chain_epochs=true"], epochs=2)
    text = one["modes"]["text"]
    assert set(one["modes"]) == {"text"} and one["epochs"] == 1
    assert text["batches"] == one["batches_per_epoch"] and sum(text["reasons"].values()) == \
        text["batches"]
    assert text["padding"] == one["padding"]
    assert (off["chain_epochs"], on["chain_epochs"]) == (False, True)
    # per epoch, each drained: the reshuffled second epoch forms as many batches
    assert off["batches_per_epoch"] == pytest.approx(one["batches_per_epoch"], rel=0.15)
    assert "drain" in off["modes"]["text"]["reasons"]
    # chained: the next epoch's first blocks join this one's second blocks' queues
    assert on["batches_per_epoch"] < off["batches_per_epoch"]
    assert on["modes"]["text"]["tokens_per_batch"] > off["modes"]["text"]["tokens_per_batch"]
    # the trainer's windows: past tokens_per_step (2,048), within window_max (1.5) x it
    for r in (off, on):
        assert 2048 <= r["window_tokens"]["mean"] <= r["window_tokens"]["max"] <= 3072


@pytest.mark.parametrize("chain,from_content", [("true", "true"), ("false", "true"),
                                                ("true", "false")])
def test_simulation_forms_the_trainers_batches(tmp_path, tokenizer, chain, from_content,
                                               trainer_batches):
    """The simulation runs the trainer's dispatcher over the trainer's source (chained or one
    run per epoch, reshuffled; texts charged by their tokens or by their characters): the
    trainer's batches are its first batches."""
    out = _dataset(tmp_path / "ds", 50)
    sets = [f"model.modes.text.tokenizer_path={tokenizer}", "dispatch.max_in_flight=24",
            "dispatch.budget=400", "train.tokens_per_step=800", f"train.chain_epochs={chain}",
            "train.checkpoint_every=0", "train.log_every=1000",
            f"train.cost_from_content={from_content}"]
    sim: list = []
    simulate_dispatch("tiny", out, sets, epochs=3, trace=sim)
    # 36 steps: the texts' exact tokens (train.cost_from_content) make fewer, larger batches
    # a step than the characters' estimate did; past 100 batches either way
    got, epoch = trainer_batches(tmp_path / "run", out, sets, 36)
    n = min(len(got), len(sim))
    assert epoch >= 1 and n > 100  # across epoch boundaries
    assert got[:n] == sim[:n]


def test_texts_charged_by_their_tokens_pad_the_grid_less(tmp_path, tokenizer):
    """Characters estimate a text's tokens loosely; charged and bucketed by its exact tokens
    (the default) a batch's grid is padded less, and the simulation counts the grid on the
    exact steps either way (its cost-model padding is the grid's only then)."""
    import sentencepiece as spm

    from blocklm.formats import Sample, ShardWriter, text_block

    words = ["the", "king", "to", "be", "xylophone", "12345", "thee", "--", "Ω", "and", "my"]
    texts = [" ".join(words[(i * 7 + j * j) % len(words)] for j in range(3 + i % 23))
             for i in range(400)]  # characters per token vary from text to text
    with ShardWriter(tmp_path / "ds", max_samples=200) as w:
        for i, t in enumerate(texts):
            w.write(Sample(f"k{i:04d}", [text_block(t)]))
    # the cost model's characters per token set to this tokenizer's rate on these texts (the
    # buckets' bounds come from the characters: a rate far off puts the exact costs in a few)
    sp = spm.SentencePieceProcessor(model_file=tokenizer)
    rate = sum(map(len, texts)) / sum(len(sp.encode(t)) for t in texts)
    sets = [f"model.modes.text.tokenizer_path={tokenizer}", "dispatch.max_in_flight=4096",
            "dispatch.prefetch=0", f"model.modes.text.chars_per_token={rate:.3f}"]
    on, off = (simulate_dispatch("tiny", str(tmp_path / "ds"), sets + [
        f"train.cost_from_content={v}"], epochs=2) for v in ("true", "false"))
    assert (on["cost_from_content"], off["cost_from_content"]) == (True, False)
    assert on["grid_padding"] == on["padding"]  # charged exactly: the cost model's padding
    assert off["grid_padding"] != off["padding"]
    assert on["grid_padding"] < off["grid_padding"]


def test_the_table_shows_padded_and_real_tokens(tmp_path, tokenizer):
    # a short CPU run of the command: its table gives both counts, as the JSON has them (the
    # GPT-2 baseline's tokens are real ones; the trainer's tokens/s counts padded steps)
    import json

    from click.testing import CliRunner

    from blocklm.tools.bench_train import bench_train

    out = _dataset(tmp_path / "ds", 300)
    res = CliRunner().invoke(bench_train, [
        "--preset", "tiny", "--data", out, "--variants", "off", "--warmup", "1", "--steps", "2",
        "--seconds", "30", "--out", str(tmp_path / "r.json"),
        "--set", f"model.modes.text.tokenizer_path={tokenizer}", "--set", "dispatch.prefetch=0"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads((tmp_path / "r.json").read_text())
    head, line = res.output.splitlines()[-2:]
    assert head.split()[:4] == ["data", "variant", "tokens/s", "real"]
    assert line.split()[2:4] == [str(row["tokens_per_s"]), str(row["real_tokens_per_s"])]
    assert row["real_tokens_per_s"] < row["tokens_per_s"]  # the text blocks vary: padding
    # each window's states (GiB): the second blocks read their first blocks' states
    states = row["window_state_gib"]
    assert len(states) == len(row["window_ktokens_peak_gib"]) and max(states) > 0
