"""``prepare``'s measured shapes (pipeline/dispatch_split.py): a block charged, bucketed and
padded by the shape measured from its content, on every admission path."""

from __future__ import annotations

import pytest

from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig

from .test_dispatch import length_cost, prep, recording_runner, run_all, sample, text


@pytest.mark.parametrize("admission", ["inline", "one_by_one", "prefetch"])
def test_a_shape_measured_by_prepare_is_charged_and_bucketed(admission):
    """``prepare`` may return a third item, the shape measured from the content (the trainer's
    texts: their exact tokens): the request carries it, costs and pads by it and lands in its
    bucket; None keeps the block's own shape. Every admission path agrees."""
    spec = BucketSpec.explicit({"text": [[4, 16]]})  # lengths 1-4 and 5-16: two buckets

    def measured(block):
        got = prep(block)
        n = len(block.payload)  # the "exact" length, which the index's shape only estimates
        return (*got, None if block.payload.startswith(b"=") else (n,))

    log: list = []
    d = Dispatcher({"text": recording_runner(log)}, spec,
                   DispatchConfig(prefetch=4, admission=admission, budget=64, ttl_steps=1),
                   cost=length_cost, prepare=measured)
    # indexed as length 3 (the short bucket), measured 12 (the long one); and one kept as is
    samples = [sample("a", text(3, "x" * 12)), sample("b", text(3, "=" * 9)),
               sample("c", text(12))]
    _, finished = run_all(d, samples)
    assert all(f.error is None for f in finished)
    reqs = {r.key: r for b in log for r in b.requests}
    assert reqs["a"].shape == (12,) and reqs["a"].cost == 12
    assert reqs["b"].shape == (3,) and reqs["b"].cost == 3
    together = [sorted(r.key for r in b.requests) for b in log]
    assert ["a", "c"] in together and ["b"] in together  # a's bucket is c's, not b's
    assert {b.padded_cost for b in log} == {24, 3}
