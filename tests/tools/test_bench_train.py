"""bench train's step timer: shares of model calls, backward+optimizer and data wait."""

from __future__ import annotations

import gc
import time
from types import SimpleNamespace

import pytest

from blocklm.tools.bench_train_timer import StepTimer


class FakeTrainer:
    """Runner calls take 20 ms, the optimizer step 10 ms; the test sleeps 30 ms between."""

    def __init__(self) -> None:
        self.runners = SimpleNamespace(window=SimpleNamespace(tokens=0, state_bytes=0),
                                       run=self._run, finish=lambda contexts: None)
        self.optimizer_step = self._opt

    def _run(self, mode, batch):
        time.sleep(0.02)
        self.runners.window.tokens += batch.padded_cost
        return []

    def _opt(self):
        time.sleep(0.01)
        self.runners.window.tokens = 0


def test_step_timer_splits_wall_time():
    tr = FakeTrainer()
    timer = StepTimer(tr)
    batch = SimpleNamespace(requests=[1, 2], padded_cost=100, cost=80)
    seen = []
    timer.hook = seen.append
    for _ in range(4):
        time.sleep(0.03)  # "the dispatcher": data wait
        tr.runners.run("text", batch)
        tr.optimizer_step()
    assert seen == [1, 2, 3, 4]
    s = timer.summary(1, params=10)
    assert s["steps"] == 3 and s["tokens"] == 300
    assert abs(s["real_tokens_per_s"] / s["tokens_per_s"] - 0.8) < 0.01  # padding not counted
    assert abs(s["share_model_calls"] + s["share_backward_optimizer"]
               + s["share_data_wait"] - 1.0) < 0.01
    assert 0.25 < s["share_model_calls"] < 0.45 and 0.4 < s["share_data_wait"] < 0.6
    assert s["batches"] == {"text": {"n": 3, "requests_mean": 2.0, "padded_tokens_mean": 100,
                                     "grid_padding": 0.2}}
    assert s["grid_padding"] == 0.2 and s["estimated_real_tokens_per_s"] == s["real_tokens_per_s"]
    assert len(s["data_wait_ms"]) == 3 and all(25 <= w < 60 for w in s["data_wait_ms"])
    assert timer.summary(4, params=10)["error"].startswith("only 4")


@pytest.mark.parametrize("from_content", [False, True])
def test_real_tokens_are_the_texts_tokens_whatever_the_dispatcher_charged(tokenizer,
                                                                        from_content):
    """Charged by characters (train.cost_from_content=false) a text batch's cost only
    estimates its steps: the timer counts the blocks' exact steps (tokens + 1) and the model's
    grid (size x longest) from the prepared texts, and keeps the estimate apart. Charged by its
    tokens, the batch's costs are those already (nothing recounted)."""
    from blocklm.model.blocklm import BlockLM
    from blocklm.model.presets import tiny

    model = BlockLM(tiny(tokenizer_path=tokenizer))
    sup = model.supports["text"]
    texts = [sup.prepare(t) for t in ("To be, or not to be", "Ay", "Good morrow, cousin. " * 3)]
    steps = [len(t.ids) + 1 for t in texts]
    tr = FakeTrainer()
    tr.model, tr.runners.cost_from_content = model, from_content
    timer = StepTimer(tr)
    if from_content:  # the dispatcher's own costs are exact
        padded, cost = len(steps) * max(steps), sum(steps)
    else:  # its estimates from the characters
        padded = len(texts) * sup.steps((max(len(t.text) for t in texts),))
        cost = sum(sup.steps((len(t.text),)) for t in texts)
    assert from_content or cost != sum(steps)  # the estimate is off for these texts
    batch = SimpleNamespace(requests=[SimpleNamespace(targets=t) for t in texts],
                            padded_cost=padded, cost=cost)
    for _ in range(3):
        tr.runners.run("text", batch)
        tr.optimizer_step()
    s = timer.summary(1, params=10)
    assert s["tokens"] == 2 * len(steps) * max(steps)
    ratio = s["real_tokens_per_s"] / s["tokens_per_s"]
    assert abs(ratio - sum(steps) / (len(steps) * max(steps))) < 0.01
    assert abs(s["estimated_real_tokens_per_s"] / s["real_tokens_per_s"] - cost / sum(steps)) \
        < 0.01


def test_per_step_times_tokens_and_quarters_show_a_run_that_slows_down():
    """``step_ms`` / ``step_real_tokens`` per timed step and ``real_tokens_per_s_by_quarter``:
    a run whose later steps take longer (the long H200 windows ran ~8% under the short ones,
    P143 / P147) shows it in its last quarters."""
    tr = FakeTrainer()
    timer = StepTimer(tr)
    for i in range(9):  # step 0 is the warm-up; steps 1-8 are timed
        batch = SimpleNamespace(requests=[1], padded_cost=100, cost=50 + 10 * (i % 2))
        time.sleep(0.01 if i < 5 else 0.12)  # the second half of the timed steps is slower
        tr.runners.run("text", batch)
        tr.optimizer_step()
    s = timer.summary(1, params=10)
    assert s["steps"] == 8 and len(s["step_ms"]) == 8
    assert s["step_real_tokens"] == [50 + 10 * (i % 2) for i in range(1, 9)]
    assert sum(s["step_real_tokens"]) * 1e3 / sum(s["step_ms"]) == \
        pytest.approx(s["real_tokens_per_s"], rel=0.02)
    assert all(ms >= 40 for ms in s["step_ms"]) and max(s["step_ms"][:4]) < min(s["step_ms"][4:])
    q = s["real_tokens_per_s_by_quarter"]
    assert len(q) == 4 and q[0] > q[2] * 1.5 and q[1] > q[3] * 1.5


def test_quarters_of_few_steps():
    from blocklm.tools.bench_train_timer import _quarters

    assert _quarters([100.0] * 8, [10] * 8) == [100] * 4  # 2 steps a quarter, 20 tokens / 0.2 s
    assert _quarters([100.0, 300.0], [10, 10]) == [100, 33]  # fewer steps than quarters
    # 5 steps: parts of 1, 1, 2 and 1 steps; the last one holds the 10 tokens
    assert _quarters([50.0] * 5, [5, 5, 5, 5, 10]) == [100, 100, 100, 200]


class HostEvent:
    """Stands in for torch.cuda.Event: the host's clock at record()."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: HostEvent) -> float:
        return (other.t - self.t) * 1e3


def test_gpu_data_gap_counts_every_interval_of_host_data_work():
    """The GPU clock between one call's work and the next: before a window's first call (the
    optimizer step's gap, also in ``gpu_window_gap_ms``) and between the calls of a window."""
    tr = FakeTrainer()
    timer = StepTimer(tr, events=HostEvent)
    batch = SimpleNamespace(requests=[1], padded_cost=10, cost=10)
    for i in range(4):
        time.sleep(0.04 if i else 0.0)  # the data work before the window's first call
        tr.runners.run("text", batch)
        time.sleep(0.02)  # data work between two calls of one window
        tr.runners.run("text", batch)
        tr.optimizer_step()
    s = timer.summary(1, params=10)
    assert len(s["gpu_data_gap_ms"]) == len(s["gpu_window_gap_ms"]) == 3
    assert all(38 <= g < 60 for g in s["gpu_window_gap_ms"])
    assert all(58 <= g < 90 for g in s["gpu_data_gap_ms"])  # 40 + 20 ms (+ ~0 before opt)
    assert 0.3 < s["share_gpu_data_gap"] < 0.7
    assert "gpu_data_gap_ms" not in StepTimer(FakeTrainer()).summary(0, params=1)  # no CUDA


def test_profiled_steps_come_after_the_timed_window():
    """With or without profiling the timed window is steps warmup+1 .. warmup+steps (the
    profiled steps used to come first and shift it onto other batches); profiling then runs
    profile_steps more; a time cap ends the timing early."""
    from blocklm.tools.bench_train import Phases

    def run(profile_steps, seconds=1e9, dt=1.0):
        ph, acts = Phases(2, 3, seconds, profile_steps), []
        for n in range(1, 20):
            a = ph.after(n, n * dt)
            acts.append((n, a)) if a else None
            if a in ("stop", "stop_profile"):
                return ph.timed_end, acts
    assert run(0) == (5, [(5, "stop")])
    assert run(2) == (5, [(5, "profile"), (7, "stop_profile")])
    assert run(1, seconds=1.5) == (4, [(4, "profile"), (5, "stop_profile")])


def test_step_timer_summary_stops_at_the_last_timed_step():
    tr = FakeTrainer()
    timer = StepTimer(tr)
    batch = SimpleNamespace(requests=[1], padded_cost=100, cost=100)
    for _ in range(5):
        tr.runners.run("text", batch)
        tr.optimizer_step()
    s = timer.summary(1, params=10, last=3)
    assert s["steps"] == 2 and s["tokens"] == 200 and s["batches"]["text"]["n"] == 2


def test_step_timer_counts_full_collections_per_step_and_lets_go():
    """``full_gc_ms``: host ms of generation-2 collections in each step (the H200's 260-350 ms
    data waits were these); the timer's process-wide callback is gone after close()."""
    tr = FakeTrainer()
    timer = StepTimer(tr)
    batch = SimpleNamespace(requests=[1], padded_cost=100, cost=100)
    junk = [[i] for i in range(300_000)]  # something for a full collection to traverse
    for step in range(4):
        tr.runners.run("text", batch)
        if step == 2:
            gc.collect()
        tr.optimizer_step()
    timer.close()
    assert timer._on_gc not in gc.callbacks
    ms = timer.summary(1, params=10)["full_gc_ms"]
    assert len(ms) == 3 and ms[1] > 0 and ms[0] == ms[2] == 0, ms
    del junk


def test_a_run_reports_the_samples_it_rejected(tmp_path, tokenizer):
    # a bench run that silently lost a mode looked fast (H200, soundfile without its cffi
    # backend): the figures now carry the dispatcher's rejections by kind
    from blocklm.formats import Block, Sample, ShardWriter, text_block
    from blocklm.tools.bench_train import run_variant
    from blocklm.tools.bench_turnover import TINY

    with ShardWriter(tmp_path / "d", max_samples=64) as w:
        for i in range(40):
            blocks = [text_block("to be or not to be, " * (1 + i % 5))]
            if i % 10 == 3:  # a WAV block whose bytes are not a WAV file
                blocks.append(Block("audio", (50, 1), "wav", b"RIFF" + bytes(60)))
            w.write(Sample(f"s{i:03d}", blocks))
    overrides = [o for o in TINY if "log_every" not in o]
    overrides.append(f"model.modes.text.tokenizer_path={tokenizer}")  # none in a fresh clone
    res = run_variant(str(tmp_path / "d"), "off", overrides, warmup=1, steps=1, seconds=30.0,
                      profile_steps=0, preset="tiny")
    assert res.get("error") is None
    # 4 bad samples an epoch, each counted when the dispatcher admits it: every epoch the run
    # went through (chained epochs; the step's epoch counts from 0) and the part of the one it
    # was in that it admitted before it stopped (a multiple of 4 only at an epoch's end)
    assert set(res["rejected"]) == {"PrepareError"}
    last = max(e for e in res["epoch_per_step"] if e is not None)
    assert 4 * max(last, 1) <= res["rejected"]["PrepareError"] <= 4 * (last + 1), (
        res["rejected"], res["epoch_per_step"])


def test_kernel_kinds_name_the_stack_chunks_and_the_compiled_heads():
    """The one-launch chunk kernels are the stack's (they were counted as "other": 266 ms of a
    6-step profile, P78), Inductor's kernels are the compiled heads', the banked attention and
    cuBLAS kernels keep their own kinds."""
    from blocklm.tools.bench_train import kernel_kind
    assert kernel_kind("_chunk_fwd") == kernel_kind("_chunk_bwd") == "stack (Triton)"
    assert kernel_kind("_iter_bwd") == "stack (Triton)"
    assert kernel_kind("triton_red_fused__to_copy_add_cumsum_embedding_gelu_3") == \
        "compiled (Inductor)"
    assert kernel_kind("fwd_o_lean") == kernel_kind("bwd_mem_all") == "banked attention (Triton)"
    assert kernel_kind("nvjet_sm90_tst_192x192_64x3_2x1_v_bz_coopB_NNN") == "matmul"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel<4>") == "other"


def test_allocator_counters_per_step_are_deltas_over_the_timed_steps():
    """The bench reports the CUDA allocator's mallocs, frees and retries per timed step (each
    cudaFree drains the GPU's queue); without CUDA there is nothing to report."""
    from blocklm.tools.bench_train_timer import ALLOC_KEYS, alloc_counts, alloc_per_step
    before = dict.fromkeys(ALLOC_KEYS, 10)
    after = {"num_device_alloc": 30, "num_device_free": 14, "num_alloc_retries": 10,
             "num_sync_all_streams": 11}
    assert alloc_per_step(before, after, 4) == {"num_device_alloc": 5.0, "num_device_free": 1.0,
                                                "num_alloc_retries": 0.0,
                                                "num_sync_all_streams": 0.25}
    assert alloc_per_step(None, after, 4) is None
    assert alloc_per_step(before, after, 0) is None
    # the pinned host allocator's counters, where both readings have them
    host_b = {**before, "num_host_alloc": 3, "num_host_free": 0, "host_alloc_ms": 1.5}
    host_a = {**after, "num_host_alloc": 7, "num_host_free": 2, "host_alloc_ms": 41.5}
    got = alloc_per_step(host_b, host_a, 4)
    assert (got["num_host_alloc"], got["num_host_free"], got["host_alloc_ms"]) == (1.0, 0.5, 10.0)
    assert "num_host_alloc" not in alloc_per_step(before, host_a, 4)
    import torch
    assert (alloc_counts() is None) == (not torch.cuda.is_available())


def test_compiles_count_dynamo_graphs_and_a_recompile():
    """``compiles`` in a run's figures: the graphs Dynamo compiled inside the timed window (a
    new shape past a guard recompiles; GPU_NOTES P108 found one in most mixed windows)."""
    import torch

    from blocklm.tools.bench_train import _compiles

    f = torch.compile(lambda x: (x * 2).sum(), backend="eager", dynamic=True)
    before = _compiles()
    f(torch.zeros(3))
    f(torch.zeros(5))  # the same graph: dynamic sizes
    assert _compiles() - before == 1
    f(torch.zeros(5, 2))  # another rank: compiled again
    assert _compiles() - before == 2


def test_a_compile_inside_the_timed_window_is_counted_and_shown(tiny_bench, monkeypatch):
    from blocklm.tools import bench_train as bt

    seen = iter(range(5, 100, 2))  # 5 at the warm-up's end, 7 at the window's: two compiles
    monkeypatch.setattr(bt, "_compiles", lambda: next(seen))
    r, res = tiny_bench("--steps", "1", "--seconds", "30")
    assert res["compiles"] == 2
    assert "2 graph compile(s) inside the timed window" in r.output


def test_a_run_cut_short_counts_its_own_steps_and_says_so(tiny_bench, monkeypatch):
    # P151: a run stopped inside its window (the call's time limit) reported the totals taken
    # at the warm-up's end as its window's: 2 compiles, 1,774 device mallocs "a step"
    from blocklm.tools import bench_train as bt
    from blocklm.tools.train.loop import Trainer

    seen = iter([5, 7])  # 5 compiles at the warm-up's end, 7 when the run ended: 2 in it
    monkeypatch.setattr(bt, "_compiles", lambda: next(seen))
    opt, calls = Trainer.optimizer_step, []

    def failing_opt(self):  # the fourth optimizer step fails (an out of memory, say)
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("the device fell over")
        return opt(self)

    monkeypatch.setattr(Trainer, "optimizer_step", failing_opt)
    r, res = tiny_bench("--steps", "50", "--seconds", "300")
    assert res["steps"] == 2  # steps 2 and 3 were timed; step 4 failed
    assert res["compiles"] == 2
    assert res["error"].startswith("RuntimeError: the device fell over")
    assert res["cut_short"].startswith("the run ended after 2 timed step(s), before its "
                                       "window's end (RuntimeError)")
    assert "the run ended after 2 timed step(s)" in r.output


def test_every_run_carries_the_machine_it_ran_on(tiny_bench):
    r, res = tiny_bench("--steps", "1", "--seconds", "30")
    m = res["machine"]
    assert m["python_loop_ns"] > 0 and m["op_launch_us"] > 0 and m["cpus"] >= 1
    assert res["machine_after"]["python_loop_ns"] > 0
    assert "machine: loop " in r.output and "; after the runs: loop " in r.output
