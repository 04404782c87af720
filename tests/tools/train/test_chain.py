"""Chained epochs (``train.chain_epochs``): one dispatcher run over epoch after epoch, and exact
resumption from a checkpoint taken while examples of two epochs are in flight."""

from __future__ import annotations

import json

import pytest
import torch

from blocklm.formats import Sample, text_block
from blocklm.tools.train.chain import EmptyEpochError, EpochChain
from blocklm.tools.train.loop import RunSpec, train
from blocklm.tools.train.metrics import read_metrics

from .textsets import phrase, write_samples


class Source:
    """A loader stand-in whose epochs differ in order and length."""

    def __init__(self, lengths: dict[int, int]) -> None:
        self.lengths, self.epoch = lengths, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        n = self.lengths.get(self.epoch, 3)
        return iter([(self.epoch, (i * 5 + self.epoch) % n) for i in range(n)])


def test_chain_numbers_epochs_on_from_an_offset_and_records_their_starts():
    src = Source({0: 5, 1: 3, 2: 4})
    ch = EpochChain(src, 0, 0, epochs=3)
    items = list(ch)
    assert items == [(e, (i * 5 + e) % n) for e, n in ((0, 5), (1, 3), (2, 4))
                     for i in range(n)]
    assert [ch.epoch_of(p) for p in (-1, 0, 4, 5, 7, 8, 11, 99)] == [0, 0, 0, 1, 1, 2, 2, 2]
    # a checkpoint: resume position 6 (epoch 1), newest admitted 8 (epoch 2)
    assert ch.state(6, 9) == [[1, 5], [2, 8]]
    assert ch.state(6, 8) == [[1, 5]]  # epoch 2 only read ahead: not recorded
    assert EpochChain.resume_args(ch.state(6, 9), 2) == (1, 5, {2: 8})
    first, start, expect = EpochChain.resume_args(ch.state(6, 9), 2)
    resumed = EpochChain(src, first, start, expect=expect, epochs=2)
    assert list(resumed) == items[5:]
    # a per-epoch run's checkpoint (no chain state): its epoch, numbered from 0
    assert EpochChain.resume_args(None, 4) == (4, 0, {})


def test_chained_batches_are_capped_and_per_epoch_ones_untouched():
    """Chained text batches reached ~3,500 examples (ep-1: 15k tokens/s on the H200); chained,
    the dispatcher's max_batch_samples is lowered to train.chain_batch_samples (1,536 in
    `small`: 2,048 examples' states, 9.3 GiB blocks, failed to allocate in mixed runs, P111)."""
    from blocklm.tools.train.chain import training_dispatch
    from blocklm.tools.train.config import TrainConfig, build_config

    on = build_config("small")
    assert training_dispatch(on).max_batch_samples == 1536
    assert TrainConfig().chain_batch_samples == 1024  # the other presets' default
    assert training_dispatch(on).mode_coalesce_tokens == on.dispatch.mode_coalesce_tokens
    off = build_config("small", ["train.chain_epochs=false"])
    assert training_dispatch(off) is off.dispatch and off.dispatch.max_batch_samples is None
    low = build_config("small", ["dispatch.max_batch_samples=300"])
    assert training_dispatch(low).max_batch_samples == 300  # a lower cap of its own stays
    free = build_config("small", ["train.chain_batch_samples=none"])
    assert training_dispatch(free) is free.dispatch


def test_chain_errors_name_the_epoch_and_what_changed():
    src = Source({0: 5, 1: 3})
    with pytest.raises(ValueError, match=r"epoch 1 of data/x starts at source position 5, "
                                         r"the checkpoint recorded 6"):
        list(EpochChain(src, 0, 0, expect={1: 6}, name="data/x"))
    with pytest.raises(EmptyEpochError, match="epoch 1 of the training data yielded no"):
        list(EpochChain(Source({0: 2, 1: 0})))  # endless otherwise


def test_a_gated_chain_reads_ahead_when_released_or_when_its_consumer_runs_short():
    """Chained, the prefetch thread read whenever its queue had room, competing for the GIL
    with the trainer's launches; gated, it reads at optimizer steps (release) and otherwise
    only to keep ``low`` samples ahead of the consumer."""
    import threading
    import time

    ch, drawn, got = EpochChain(Source({0: 50}), epochs=1), [0], []
    ch.gate(lambda: drawn[0], low=4)
    ch.release(2)  # the first release starts the gating (a resume skips positions first)
    reader = threading.Thread(target=lambda: got.extend(ch), daemon=True)
    reader.start()

    def settles_at(n):
        deadline = time.monotonic() + 10
        while len(got) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.1)  # and reads no further
        return len(got)
    assert settles_at(4) == 4  # low samples ahead of the consumer, then it holds
    drawn[0] = 3
    assert settles_at(7) == 7  # the consumer took some: it keeps low ahead
    ch.release(20)
    assert settles_at(20) == 20
    ch.release()
    reader.join(10)
    assert got == list(Source({0: 50}))  # the same samples in the same order


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    """30 samples, every third with a second text block (its context crosses batches)."""
    def blocks(i):
        t = phrase(i, 2, 6)
        return [text_block(t)] + ([text_block(t[::-1] + " and more")] if i % 3 == 0 else [])
    return write_samples(tmp_path_factory.mktemp("chain"), 30, blocks, max_samples=8,
                         prefix="s")


def _spec(dataset, tokenizer, *extra) -> RunSpec:
    # 12 in flight of a 30-sample epoch: an epoch's tail and the next one's head share batches;
    # 8 read ahead: a resume skips more positions than that (a gated read-ahead hung on them).
    # Steps and budget sized for the texts' exact tokens (train.cost_from_content: the test
    # tokenizer's ~2.5 characters a token, 1.6 times the characters' estimate)
    return RunSpec("tiny", [dataset], None, [
        f"model.modes.text.tokenizer_path={tokenizer}", "train.tokens_per_step=240",
        "dispatch.budget=160", "dispatch.max_in_flight=12", "train.log_every=1",
        "train.warmup=2", "train.lr=0.01", "train.checkpoint_every=0", "dispatch.prefetch=8",
        "train.chain_epochs=true", *extra])


def _epochs_in_flight(run) -> set[int]:
    """The epochs of the examples in flight in ``run``'s checkpoint (from its chain state)."""
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    chain = ck["loader"]["chain"]
    return {max(e for e, s in chain if s <= x["example"])
            for x in ck["dispatcher"]["in_flight"]}


def _params(run) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def test_chained_resume_is_exact_with_two_epochs_in_flight(tmp_path, dataset, tokenizer):
    """Stopped at step 3, examples of epochs 0 and 1 are in flight; the resumed run rebuilds
    the chain from epoch 0 and gives the uninterrupted run's losses and parameters bitwise."""
    full = tmp_path / "full"
    train(full, _spec(dataset, tokenizer), steps=12, progress=False, tensorboard=False)
    half = tmp_path / "half"
    train(half, _spec(dataset, tokenizer), steps=3, progress=False, tensorboard=False)
    assert _epochs_in_flight(half) == {0, 1}
    assert read_metrics(half)[-1]["epoch"] == 1  # the newest admitted sample's epoch
    train(half, steps=12, resume=True, progress=False, tensorboard=False)
    a, b = read_metrics(full), read_metrics(half)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 13))
    assert [(r["loss"], r["epoch"]) for r in a] == [(r["loss"], r["epoch"]) for r in b]
    assert a[-1]["epoch"] >= 4  # several epochs went by, none of them drained
    pa, pb = _params(full), _params(half)
    assert pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def test_chained_batches_mix_epochs_and_off_runs_one_epoch_per_run(tmp_path, dataset,
                                                                  tokenizer):
    """On: one dispatcher run, and some batch holds samples of two epochs. Off: a run per
    epoch, each drained (batches of one epoch only), as before the option."""
    from blocklm.tools.train.loop import Trainer

    seen = {}
    for chain in (True, False):
        spec = _spec(dataset, tokenizer, f"train.chain_epochs={str(chain).lower()}")
        tr = Trainer(tmp_path / str(chain), spec, resume=False, remote=None, progress=False,
                     tensorboard=False)
        runs, batches = [], []
        run, disp_run = tr.runners.run, tr.disp.run
        tr.disp.run = (lambda source, runs=runs, disp_run=disp_run, **kw:
                       runs.append(kw) or disp_run(source, **kw))

        def on_run(mode, batch, run=run, tr=tr, batches=batches):
            batches.append({r.example // 30 for r in batch.requests})  # 30 samples an epoch
            return run(mode, batch)
        tr.runners.run = on_run
        tr.fit(steps=14, minutes=None)  # several epochs at the texts' exact tokens
        seen[chain] = (len(runs), sum(len(b) > 1 for b in batches), tr.epoch)
    assert seen[True][0] == 1 and seen[True][1] > 0 and seen[True][2] >= 4
    assert seen[False][0] >= 3 and seen[False][1] == 0  # positions restart at 0 each epoch


def test_checkpoints_across_the_switch(tmp_path, dataset, tokenizer):
    """A per-epoch run's checkpoint (the format before chaining) resumes chained from its
    epoch (without the chained batch cap it never had); a chained one refuses to resume per
    epoch, with the reason."""
    old = tmp_path / "old"
    train(old, _spec(dataset, tokenizer, "train.chain_epochs=false"), steps=3, progress=False,
          tensorboard=False)
    ck = torch.load(old / "checkpoint.pt", weights_only=True)
    assert "chain" not in ck["loader"] and ck["dispatcher"]["in_flight"]
    meta = json.loads((old / "run.json").read_text())
    meta["overrides"].remove("train.chain_epochs=false")  # resumed chained (the later "=true")
    (old / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="per-epoch runs.*chain_batch_samples=none"):
        train(old, steps=6, resume=True, progress=False, tensorboard=False)  # capped batches
    meta["overrides"].append("train.chain_batch_samples=none")
    (old / "run.json").write_text(json.dumps(meta))
    out = train(old, steps=6, resume=True, progress=False, tensorboard=False)
    assert out["step"] == 6 and read_metrics(old)[-1]["epoch"] >= ck["epoch"]
    assert torch.load(old / "checkpoint.pt", weights_only=True)["loader"]["chain"]
    meta["overrides"] += ["train.chain_epochs=false"]
    (old / "run.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="written with chained epochs.*chain_epochs=true"):
        train(old, steps=7, resume=True, progress=False, tensorboard=False)


class RankSource:
    """One rank's loader stand-in: ``lengths[epoch]`` samples (ranks differ), reshuffled per
    epoch, of one or two text blocks each."""

    def __init__(self, rank: int, lengths: dict[int, int]) -> None:
        self.rank, self.lengths, self.epoch = rank, lengths, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        from blocklm.formats import Block

        e, n = self.epoch, self.lengths.get(self.epoch, 6)
        for i in ((j * 5 + e) % n for j in range(n)):
            blocks = [Block("text", (1 + (7 * i + e) % 23,), "raw", b"")] * (1 + i % 2)
            yield Sample(f"r{self.rank}-e{e}-{i}", blocks)


def _ranks(lengths, steps, states=None):
    """Run one dispatcher per rank in threads (SimulatedGroup) over chained epochs for ``steps``
    steps, from ``states`` (a checkpoint per rank) or the start; (traces, checkpoints)."""
    import threading

    from blocklm.pipeline.buckets import BucketSpec
    from blocklm.pipeline.dispatch import Dispatcher
    from blocklm.pipeline.dispatch_dist import SimulatedGroup
    from blocklm.pipeline.dispatch_types import DispatchConfig, Result

    group = SimulatedGroup(len(lengths), timeout=20)
    traces, saved, errors = [[] for _ in lengths], [None] * len(lengths), []

    def work(rank):
        try:
            def runner(batch):
                traces[rank].append((batch.mode, batch.reason, [r.key for r in batch.requests]))
                return [Result() for _ in batch.requests]
            d = Dispatcher({"text": runner}, BucketSpec.explicit({"text": [[8, 16, 24]]}),
                           DispatchConfig(prefetch=0, decode=False, budget=60, max_in_flight=5,
                                          ttl_steps=6), agree=group.agree(rank), rank=rank)
            first, start, expect = 0, 0, {}
            if states is not None:
                d.load_state_dict(states[rank]["dispatcher"])
                first, start, expect = EpochChain.resume_args(states[rank]["chain"], -1)
            chain = EpochChain(RankSource(rank, lengths[rank]), first, start, expect=expect)
            for n, _ in enumerate(d.run(chain, offset=start), 1):
                if n == steps:
                    st = d.state_dict()
                    saved[rank] = {"dispatcher": st, "chain": chain.state(
                        Dispatcher.resume_position(st), st["drawn"])}
                    break
        except BaseException as e:  # surface thread failures in the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(lengths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return traces, saved


def test_ranks_with_different_epoch_lengths_stay_in_step_and_resume_exactly():
    """Each rank chains its own epochs (of different lengths: their boundaries fall at different
    steps); a checkpoint with two epochs in flight resumes every rank to the same batches."""
    lengths = [{0: 7, 1: 5, 2: 8}, {0: 11, 1: 9, 2: 4}]
    full, _ = _ranks(lengths, 40)
    assert [len(t) for t in full] == [40, 40]
    head, saved = _ranks(lengths, 12)
    for rank in (0, 1):
        chain, st = saved[rank]["chain"], saved[rank]["dispatcher"]
        assert len(chain) >= 2 and chain[0][0] >= 1  # resumed from a later epoch's start
        assert len({max(e for e, s in chain if s <= x["example"]) for x in st["in_flight"]}) == 2
    assert saved[0]["chain"] != saved[1]["chain"]  # each rank's own epoch starts
    tail, _ = _ranks(lengths, 28, states=saved)
    assert [h + t for h, t in zip(head, tail)] == full


@pytest.mark.slow  # three 2-process gloo runs: ~20 s
@pytest.mark.parametrize("state_cap", [None, 0.0001])
def test_two_process_chained_resume_is_exact(tmp_path, dataset, tokenizer, state_cap):
    """Under torchrun each rank chains its share's epochs and checkpoints its own chain state;
    stopped with several epochs in flight and resumed, 2 ranks give the uninterrupted run's losses
    and parameters bitwise. With a state cap (train.window_max_state_gib: ~4 rows of the tiny
    model's states) a window closes when either rank's batches reach it: the ranks agree, and
    the resumed run closes the same windows."""
    import os
    import subprocess
    import sys

    base = ["-m", "blocklm.tools.cli", "train", "--quiet"]
    port = 29600 + (os.getpid() % 1000)

    def launch(out, steps, *args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), *base,
               "--out", str(out), "--steps", str(steps), *args]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    cap = [] if state_cap is None else [f"train.window_max_state_gib={state_cap}"]
    sets = [a for o in _spec(dataset, tokenizer, *cap).overrides for a in ("--set", o)]
    new = ["--preset", "tiny", "--data", dataset, *sets]
    launch(tmp_path / "full", 6, *new)
    launch(tmp_path / "half", 3, *new)
    spans = []
    for rank in (0, 1):
        ck = torch.load(tmp_path / "half" / f"rank-{rank}.pt", weights_only=True)
        chain = ck["loader"]["chain"]
        spans.append({max(e for e, s in chain if s <= x["example"])
                      for x in ck["dispatcher"]["in_flight"]})
    assert min(len(s) for s in spans) >= 2, spans  # 15 samples a rank, 12 in flight
    launch(tmp_path / "half", 6, "--resume")
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "half")
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 7))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    pa, pb = _params(tmp_path / "full"), _params(tmp_path / "half")
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


def _largest_window(run_dir, dataset, tokenizer, *overrides) -> int:
    """Padded tokens of the largest full window of 12 steps with ``overrides`` (tokens_per_step
    60, batches as large as a window)."""
    from collections import Counter

    from blocklm.tools.train.loop import Trainer

    spec = _spec(dataset, tokenizer, *overrides, "train.tokens_per_step=60",
                 "dispatch.max_in_flight=30")
    tr = Trainer(run_dir, spec, resume=False, remote=None, progress=False, tensorboard=False)
    tokens: Counter = Counter()
    run = tr.runners.run

    def on_run(mode, batch):
        tokens[tr.runners.window.index] += batch.padded_cost
        return run(mode, batch)
    tr.runners.run = on_run
    tr.fit(steps=12, minutes=None)
    full = [v for k, v in tokens.items() if k < max(tokens)]  # the last may be partial
    assert len(full) >= 11 and min(full) >= 60
    return max(full)


def test_windows_are_capped_at_window_max_times_tokens_per_step(tmp_path, dataset, tokenizer):
    """A window's batches keep their activations until its backward, so train.window_max caps
    its padded tokens (here 1.5 x 60 = 90): uncapped, the batch that crosses tokens_per_step
    took the window past it (chained mixed windows reached 2x on the H200, out of memory)."""
    most = {cap: _largest_window(tmp_path / cap, dataset, tokenizer, f"train.window_max={cap}")
            for cap in ("1.5", "none")}
    assert most["1.5"] <= 90 < most["none"]


def test_a_modes_window_room_replaces_window_max_for_its_batches(tmp_path, dataset, tokenizer):
    """train.window_mode_max gives one mode's batches their own room (here text 2.5 x 60 =
    150, against 90 for the rest): the trainer's windows then grow past window_max."""
    capped = _largest_window(tmp_path / "a", dataset, tokenizer, "train.window_max=1.5")
    roomy = _largest_window(tmp_path / "b", dataset, tokenizer, "train.window_max=1.5",
                            'train.window_mode_max={"text": 2.5}')
    assert capped <= 90 < roomy <= 150


def test_a_window_cap_under_one_step_is_refused():
    from blocklm.tools.train.config import build_config

    with pytest.raises(ValueError, match="window_max must be at least 1"):
        build_config("tiny", ["train.window_max=0.5"])
    assert build_config("tiny", ["train.window_max=none"]).train.window_max is None
    for bad in ("0.5", "true", '"2"'):
        with pytest.raises(ValueError, match="window_mode_max\\['image'\\] must be a number >= 1"):
            build_config("tiny", [f'train.window_mode_max={{"image": {bad}}}'])
    assert build_config("tiny", ['train.window_mode_max={"image": 2}']).train.window_mode_max \
        == {"image": 2}
    with pytest.raises(ValueError, match="names mode 'images', which the model does not have"):
        build_config("tiny", ['train.window_mode_max={"images": 2}'])
