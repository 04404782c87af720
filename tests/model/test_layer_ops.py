"""The data movement of one `small` text batch on the kernels' route stays low (bench_layer_ops).

Counts, not timings: CUDA kernels outside matrix products (estimated from the ATen ops) and
data-movement ops of one batch, forward + backward. Before attention_io (HEAD 074f039) this
batch took 833 + 1,218 such kernels and 851 data-movement ops; now 701 + 918 and 671."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.slow
def test_small_text_batch_moves_less(monkeypatch, tokenizer_path):
    from blocklm.model import attention, banked_triton
    from blocklm.tools import bench_layer_ops

    # run() routes the CPU through the kernels' path: restore both afterwards
    monkeypatch.setattr(banked_triton, "BankedAttentionFn", banked_triton.BankedAttentionFn)
    monkeypatch.setattr(attention, "kernel_path", attention.kernel_path)
    threads = torch.get_num_threads()
    try:
        res = bench_layer_ops.run(batch=4, words=(5, 8), stack=False, seed=0, sites=5,
                                  tokenizer=tokenizer_path)
    finally:
        torch.set_num_threads(threads)
    fwd, bwd = res["forward"], res["backward"]
    kernels = fwd["est_cuda_kernels_not_matmul"] + bwd["est_cuda_kernels_not_matmul"]
    assert 0 < kernels <= 1650, res  # was 2,051
    assert 0 < fwd["moves"] + bwd["moves"] <= 700, res  # was 851
    assert len(res["sites_kb_per_token"]) == 5
