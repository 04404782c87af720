"""``Dispatcher.run(prefetch=...)``: a per-run read-ahead depth (the trainer admits an epoch that
is already read and prepared in memory without the prefetch thread); batches never change."""

from __future__ import annotations

import threading

from blocklm.pipeline.dispatch import Dispatcher
from blocklm.pipeline.dispatch_types import DispatchConfig, Result

from .test_dispatch import length_cost, prep, random_samples


def _batches(samples, prefetch):
    log, threads = [], []

    def run(batch):
        threads.append({t.name for t in threading.enumerate()})
        log.append((batch.mode, tuple((r.key, r.block) for r in batch.requests)))
        return [Result(state=None) for _ in batch.requests]

    d = Dispatcher({"text": run, "image": run}, None,
                   DispatchConfig(max_in_flight=16, budget=120, prefetch=64, prefetch_chunk=4),
                   cost=length_cost, prepare=prep)
    for _ in d.run(samples, prefetch=prefetch):
        pass
    return log, threads, d.metrics()


def test_run_without_the_prefetch_thread_forms_the_same_batches():
    samples = random_samples(200, seed=3)
    threaded, t_threads, t_metrics = _batches(samples, None)
    inline, i_threads, i_metrics = _batches(samples, 0)
    assert inline == threaded and len(inline) > 20
    assert i_metrics == t_metrics
    assert not any("dispatch-prefetch" in names for names in i_threads)
    assert any("dispatch-prefetch" in names for names in t_threads)  # config.prefetch: a thread
