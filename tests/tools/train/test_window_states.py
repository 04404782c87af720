"""train.window_max_state_gib: a window also closes once its batches hold that much recurrent
state ([B, state_size] in and out), which the token rooms do not count (GPU_NOTES P137: the
H200's peak memory on mixed data followed the states)."""

from __future__ import annotations

import pytest
import torch

from blocklm.formats import text_block
from blocklm.model.blocklm import BlockLM
from blocklm.tools.bench_train import simulate_dispatch
from blocklm.tools.train.config import build_config
from blocklm.tools.train.loop import RunSpec, Trainer, train
from blocklm.tools.train.metrics import read_metrics

from .textsets import phrase, write_samples


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """40 samples, every other one with a second and a third text block (states cross batches)."""
    def blocks(i):
        t = phrase(i, 2, 6)
        more = [text_block(t[::-1]), text_block(t + " again")] if i % 2 == 0 else []
        return [text_block(t)] + more
    return write_samples(tmp_path_factory.mktemp("winstates"), 40, blocks, max_samples=10,
                         prefix="w")


def _sets(tokenizer, *extra) -> list[str]:
    return [f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=300",
            "dispatch.budget=100", "dispatch.max_in_flight=16", "train.log_every=1",
            "train.warmup=2", "train.lr=0.01", "train.checkpoint_every=0", "dispatch.prefetch=8",
            *extra]


def _gib_of_rows(tokenizer, rows: int) -> float:
    """``rows`` examples' fp32 states of the tiny model, in GiB (the cap's unit)."""
    model = BlockLM(build_config("tiny", _sets(tokenizer)).model)
    return rows * model.state_size * 4 / 2**30


def _windows(tmp_path, dataset, tokenizer, *extra) -> tuple[list[list[tuple]], int]:
    """Per window, per batch: (padded tokens so far, state bytes so far, state bytes the batch
    should add), over 10 optimizer steps; and the tiny model's bytes per state row."""
    tr = Trainer(tmp_path, RunSpec("tiny", [dataset], None, _sets(tokenizer, *extra)),
                 resume=False, remote=None, progress=False, tensorboard=False)
    row = tr.model.state_size * 4
    wins: dict[int, list[tuple]] = {}
    run = tr.runners.run

    def on_run(mode, batch):
        reqs = batch.requests
        holds = any(r.context is not None for r in reqs) + (not all(r.last for r in reqs))
        out = run(mode, batch)
        w = tr.runners.window
        wins.setdefault(w.index, []).append((w.tokens, w.state_bytes, holds * len(reqs) * row))
        return out
    tr.runners.run = on_run
    tr.fit(steps=10, minutes=None)
    return [wins[k] for k in sorted(wins)], row


def test_a_window_closes_at_its_first_batch_past_the_state_cap(tmp_path, dataset, tokenizer):
    """The runner counts each batch's states in and out; a window closes at its first batch
    that takes its tokens to tokens_per_step or its states to the cap, and not before."""
    cap = _gib_of_rows(tokenizer, 20)
    wins, row = _windows(tmp_path / "a", dataset, tokenizer, f"train.window_max_state_gib={cap}")
    limit = cap * 2**30
    by_states = 0
    for w in wins[:-1]:  # the last may still be open
        added = [b - a for (_, a, _), (_, b, _) in zip([(0, 0, 0)] + w, w)]
        assert added == [want for *_, want in w]  # the runner's count, batch by batch
        assert all(tok < 300 and st < limit for tok, st, _ in w[:-1])
        tok, st, _ = w[-1]
        assert tok >= 300 or st >= limit
        by_states += tok < 300
    assert by_states >= 2  # the cap closed windows before their tokens did
    plain, _ = _windows(tmp_path / "b", dataset, tokenizer)
    assert all(w[-1][0] >= 300 for w in plain[:-1])  # without it: tokens alone
    assert max(w[-1][1] for w in plain[:-1]) > limit  # and windows held more states


def test_a_run_with_a_state_cap_resumes_exactly(tmp_path, dataset, tokenizer):
    """The cap depends only on the batches (not on measured memory), so a resumed run closes
    the same windows: losses and parameters as the uninterrupted run's, bitwise."""
    sets = _sets(tokenizer, f"train.window_max_state_gib={_gib_of_rows(tokenizer, 20)}")
    full, half = tmp_path / "full", tmp_path / "half"
    train(full, RunSpec("tiny", [dataset], None, sets), steps=8, progress=False,
          tensorboard=False)
    train(half, RunSpec("tiny", [dataset], None, sets), steps=3, progress=False,
          tensorboard=False)
    train(half, steps=8, resume=True, progress=False, tensorboard=False)
    a, b = read_metrics(full), read_metrics(half)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    plain = tmp_path / "plain"  # the cap closed windows here: without it, other steps
    train(plain, RunSpec("tiny", [dataset], None, _sets(tokenizer)), steps=8, progress=False,
          tensorboard=False)
    assert [r["loss"] for r in read_metrics(plain)] != [r["loss"] for r in a]
    pa = torch.load(full / "checkpoint.pt", weights_only=True)["model"]
    pb = torch.load(half / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def test_the_simulation_closes_the_same_windows(tmp_path, dataset, tokenizer, trainer_batches):
    """bench train --simulate counts the states as the trainer's runner does: with the cap it
    forms the trainer's batches. The window's room binds here (window_max 1.0 under a larger
    budget), so where a window closes decides the next batches: without the cap's closes the
    simulation forms other ones."""
    room = ["dispatch.budget=400", "train.window_max=1.0", "dispatch.prefetch=0",
            "train.log_every=1000"]
    cap = f"train.window_max_state_gib={_gib_of_rows(tokenizer, 20)}"
    sim: list = []
    res = simulate_dispatch("tiny", dataset, _sets(tokenizer, cap, *room), epochs=3, trace=sim)
    assert res["windows_closed_by_states"] >= 1
    plain: list = []
    simulate_dispatch("tiny", dataset, _sets(tokenizer, *room), epochs=3, trace=plain)
    # 12 steps: past 20 batches at the texts' exact tokens (train.cost_from_content)
    got, _ = trainer_batches(tmp_path / "run", dataset, _sets(tokenizer, cap, *room), 12)
    n = min(len(got), len(sim))
    assert n > 20 and got[:n] == sim[:n]
    assert plain[:n] != sim[:n]


def test_the_setting_is_checked_and_small_sets_it():
    assert build_config("small").train.window_max_state_gib == 32.0
    assert build_config("tiny").train.window_max_state_gib is None
    assert build_config("small", ["train.window_max_state_gib=none"]).train \
        .window_max_state_gib is None
    for bad in ("0", "-1"):
        with pytest.raises(ValueError, match="window_max_state_gib must be a number of GiB > 0"):
            build_config("tiny", [f"train.window_max_state_gib={bad}"])
    for bad in ("true", '"32"'):  # the override's own type check
        with pytest.raises(ValueError, match="train.window_max_state_gib: expected float"):
            build_config("tiny", [f"train.window_max_state_gib={bad}"])


def test_an_out_of_memory_names_the_window_and_the_settings(tmp_path, dataset, tokenizer):
    """A device out of memory mid-run is re-raised (same type, the original chained) with the
    step, its window's tokens and states, the caps and the settings that lower them."""
    tr = Trainer(tmp_path, RunSpec("tiny", [dataset], None, _sets(
        tokenizer, "train.window_max_state_gib=32")), resume=False, remote=None,
        progress=False, tensorboard=False)
    run, calls = tr.runners.run, [0]

    def failing(mode, batch):
        calls[0] += 1
        if calls[0] == 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 6.96 GiB.")
        return run(mode, batch)
    tr.runners.run = failing
    with pytest.raises(torch.OutOfMemoryError) as got:
        tr.fit(steps=50, minutes=None)
    msg = str(got.value)
    w = tr.runners.window
    assert msg.startswith(f"{tmp_path}: out of memory in optimizer step {tr.step + 1}: ")
    assert f"held {w.tokens:,} padded tokens" in msg and w.tokens > 0
    assert "train.window_max_state_gib=32" in msg and "train.cuda_alloc=none" in msg
    assert "train.checkpoint_every=0" in msg  # no checkpoint to resume from
    assert msg.endswith("PyTorch said: CUDA out of memory. Tried to allocate 6.96 GiB.")
    assert isinstance(got.value.__cause__, torch.OutOfMemoryError)


def test_an_out_of_memory_between_windows_is_not_blamed_on_one(tmp_path, dataset, tokenizer):
    """Evaluation, checkpoints and logs run after a window closed: an out of memory there
    names the step it followed, not an empty window."""
    tr = Trainer(tmp_path, RunSpec("tiny", [dataset], None, _sets(tokenizer)), resume=False,
                 remote=None, progress=False, tensorboard=False)
    opt = tr.optimizer_step

    def failing():
        opt()
        if tr.step == 2:
            raise torch.OutOfMemoryError("CUDA out of memory.")
    tr.optimizer_step = failing
    with pytest.raises(torch.OutOfMemoryError) as got:
        tr.fit(steps=5, minutes=None)
    assert str(got.value).startswith(
        f"{tmp_path}: out of memory after optimizer step 2, outside a window's batches. ")
