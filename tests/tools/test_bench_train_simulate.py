"""bench train --simulate: the per-mode breakdown and the epochs-per-run what-if."""

from __future__ import annotations

from blocklm.formats import Sample, ShardWriter, text_block
from blocklm.tools.bench_train import simulate_dispatch


def test_simulate_reports_modes_and_chained_epochs(tmp_path, tokenizer):
    out = tmp_path / "ds"
    with ShardWriter(out, max_samples=100) as w:
        for i in range(300):  # two text blocks each: the second queues after the first runs
            w.write(Sample(f"k{i:04d}", [text_block("x" * (1 + i % 97)),
                                         text_block("y" * (1 + (7 * i) % 89))]))
    # the test's own tokenizer: a clean checkout has no data/shards/tokenizer.model
    sets = [f"model.modes.text.tokenizer_path={tokenizer}", "dispatch.max_in_flight=4096",
            "dispatch.prefetch=0"]
    one = simulate_dispatch("tiny", str(out), sets)
    two = simulate_dispatch("tiny", str(out), sets, epochs=2)
    text = one["modes"]["text"]
    assert set(one["modes"]) == {"text"} and one["epochs"] == 1
    assert text["batches"] == one["batches_per_epoch"] and sum(text["reasons"].values()) == \
        text["batches"]
    assert text["padding"] == one["padding"]
    # two epochs in one run: the second blocks' queues hold twice the examples
    assert two["batches_per_epoch"] < one["batches_per_epoch"]
    assert two["modes"]["text"]["tokens_per_batch"] > text["tokens_per_batch"]
