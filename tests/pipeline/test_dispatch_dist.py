"""Several ranks in step: same number of runner steps, same modes in the same order."""

from __future__ import annotations

import random
import threading

import pytest

from blocklm.formats import Block, Sample
from blocklm.pipeline.buckets import BucketSpec
from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_dist import IDLE, SimulatedGroup, choose, local_agree
from blocklm.pipeline.dispatch_types import DispatchConfig, Result


def rank_samples(rank: int, n: int) -> list[Sample]:
    rng = random.Random(rank)
    out = []
    for i in range(n):
        blocks = []
        for _ in range(rng.randint(1, 3)):
            if rank == 2 or rng.random() < 0.6:  # rank 2 has text only
                blocks.append(Block("text", (rng.randint(1, 50),), "raw", b""))
            else:
                blocks.append(Block("image", rng.choice([(4, 8, 1), (8, 4, 1)]), "raw", b""))
        out.append(Sample(f"r{rank}-{i}", blocks))
    return out


def cost(mode, shape):
    n = 1
    for d in shape:
        n *= d
    return n


def run_ranks(sizes, **cfg):
    group = SimulatedGroup(len(sizes), timeout=20)
    traces = [[] for _ in sizes]
    metrics, finished, errors = [None] * len(sizes), [0] * len(sizes), []

    def work(rank):
        try:
            def runner(batch):
                traces[rank].append((batch.mode, batch.reason, len(batch.requests)))
                return [Result() for _ in batch.requests]

            spec = BucketSpec.explicit({"text": [[10, 25, 50]], "image": [[4, 8], [4, 8], [1]]})
            d = Dispatcher({"text": runner, "image": runner}, spec,
                           DispatchConfig(prefetch=0, decode=False, **cfg), cost=cost,
                           agree=group.agree(rank), rank=rank)
            for st in d.run(rank_samples(rank, sizes[rank])):
                finished[rank] += len(st.finished)
            metrics[rank] = d.metrics()
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(sizes))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return traces, metrics, finished, group


@pytest.mark.parametrize("cfg", [dict(budget=100, max_in_flight=8, ttl_steps=4),
                                 dict(budget=200, max_in_flight=64, ttl_steps=50)])
def test_equal_step_counts_across_simulated_ranks(cfg):
    sizes = [120, 40, 70]
    traces, metrics, finished, group = run_ranks(sizes, **cfg)
    assert finished == sizes
    steps = [m["steps"] for m in metrics]
    assert steps[0] == steps[1] == steps[2] > 0
    # the same mode at every step on every rank: each mode's head joins the same steps
    modes = [[t[0] for t in tr] for tr in traces]
    assert modes[0] == modes[1] == modes[2]
    assert [m["steps_by_mode"] for m in metrics].count(metrics[0]["steps_by_mode"]) == 3
    # ranks with less data (or without images: rank 2) pad with empty batches
    assert metrics[1]["empty_steps"] > 0 and metrics[2]["empty_steps"] > 0
    assert all(n == 0 for tr in traces for (_, reason, n) in tr if reason == "empty")
    # one agreement per step plus the final one where every rank is done
    assert group.calls == [steps[0] + 1] * 3
    for r, m in enumerate(metrics):
        total = sum(len(s.blocks) for s in rank_samples(r, sizes[r]))
        assert sum(x["requests"] for x in m["modes"].values()) == total


def test_choose_rule():
    assert choose([IDLE, IDLE]) is None
    assert choose([(1, 0, 5, 1), (1, 1, 0, 0)]) == 1  # urgency first
    assert choose([(1, 2, 3, 1), (1, 2, 7, 0)]) == 1  # then the oldest
    assert choose([(1, 1, 3, 1), (1, 1, 3, 0)]) == 1  # then the lower mode index
    assert choose([(1, 1, 3, 0), IDLE, (1, 1, 3, 0)]) == 0  # then the lower rank
    assert local_agree((1, 0, 0, 0)) == [(1, 0, 0, 0)]


def test_torch_agree_single_process_gloo():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("torch.distributed unavailable or already initialised")
    from blocklm.pipeline.dispatch_dist import torch_agree

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        agree = torch_agree()
        assert agree((1, 2, 30, 1)) == [(1, 2, 30, 1)]
    finally:
        dist.destroy_process_group()
