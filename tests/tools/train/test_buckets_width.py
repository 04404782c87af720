"""make_buckets passes the run's bucket width cap through (the small preset drops the split)."""

from __future__ import annotations

from blocklm.formats import Sample, ShardWriter, text_block
from blocklm.pipeline import RemoteConfig
from blocklm.tools.train.config import small
from blocklm.tools.train.loop import make_buckets


def test_bucket_width_cap_controls_the_number_of_text_buckets(tmp_path):
    out = tmp_path / "ds"
    with ShardWriter(out, max_samples=100) as w:
        for i in range(400):  # lengths 1..400 characters: many distinct shapes
            w.write(Sample(f"k{i:04d}", [text_block("x" * (i + 1))]))

    def cost(mode, shape):
        return max(1, shape[0] // 4)

    split = make_buckets([str(out)], cost, RemoteConfig(), 0.06).modes["text"]
    quant = make_buckets([str(out)], cost, RemoteConfig(), None).modes["text"]
    n_split, n_quant = len(split.bounds[0]), len(quant.bounds[0])
    assert n_quant <= 16 < n_split  # quantiles only: at most buckets_per_dim per dimension
    assert small().train.bucket_max_width == {"audio": 0.06}  # text: quantiles only
