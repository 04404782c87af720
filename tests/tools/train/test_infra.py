"""Training infrastructure: overrides, schedule, atomic checkpoints with RNG state, metrics."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from blocklm.tools.cli import main
from blocklm.tools.train.checkpoint import (
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from blocklm.tools.train.metrics import MetricsLog, read_metrics
from blocklm.tools.train.overrides import OverrideError, apply_override
from blocklm.tools.train.schedule import warmup_cosine


@dataclass
class Inner:
    layers: int = 2
    rate: float = 0.1
    name: str | None = None
    on: bool = True


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    modes: dict = field(default_factory=lambda: {"text": Inner()})
    sizes: tuple = (1, 2)


def test_overrides_are_typed_by_field():
    cfg = Outer()
    for a in ("inner.layers=4", "inner.rate=3e-4", "inner.name=none", "inner.on=false",
              "modes.text.layers=7", "sizes=[3,4,5]"):
        apply_override(cfg, a)
    assert cfg.inner == Inner(4, 3e-4, None, False)
    assert cfg.modes["text"].layers == 7 and cfg.sizes == (3, 4, 5)
    apply_override(cfg, "inner.name=abc")
    assert cfg.inner.name == "abc"


@pytest.mark.parametrize("bad,match", [
    ("inner.layerz=1", "no such field"), ("inner.layers=two", "expected int"),
    ("modes.image.layers=1", "no such key"), ("inner.on=maybe", "boolean"), ("inner", "key=value"),
])
def test_bad_overrides_say_what_is_wrong(bad, match):
    with pytest.raises(OverrideError, match=match):
        apply_override(Outer(), bad)


def test_warmup_cosine_shape():
    f = [warmup_cosine(s, warmup=10, total=110, floor=0.1) for s in range(130)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[60] == pytest.approx(0.55)
    assert f[110] == pytest.approx(0.1) and f[129] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))


def test_checkpoint_round_trip_restores_rng(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = {"model": {"w": torch.arange(4.0)}, "step": 7, "rng": rng_state()}
    save_checkpoint(tmp_path, state)
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    back = load_checkpoint(tmp_path)
    set_rng_state(back["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
    assert back["step"] == 7 and torch.equal(back["model"]["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, {"step": 1})

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        save_checkpoint(tmp_path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(tmp_path)["step"] == 1


def test_metrics_log_and_plot(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    for step in range(5):
        log.log({"step": step, "loss": {"text": 5.0 - step, "audio": 3.0 - 0.1 * step},
                 "lr": 1e-3})
    log.log({"step": 5, "eval_loss": {"text": 1.5}})
    log.close()
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == list(range(6)) and recs[2]["loss"]["text"] == 3.0
    assert any((tmp_path / "tb").iterdir())
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": {"te')  # a torn last line, as after a kill
    assert len(read_metrics(tmp_path)) == 6
    res = CliRunner().invoke(main, ["plot", str(tmp_path), "--out", str(tmp_path / "l.png")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_losses_is_a_clear_error(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "lr": 1.0}) + "\n")
    res = CliRunner().invoke(main, ["plot", str(tmp_path)])
    assert res.exit_code != 0 and "no loss values" in res.output


def test_shuffled_validation_source_mixes_runs_the_same_way_every_time(tmp_path):
    from blocklm.formats import Sample, ShardWriter, text_block
    from blocklm.tools.train.evaluate import validation_source

    with ShardWriter(tmp_path / "val", max_samples=50) as w:  # two runs of one source each
        for i in range(200):
            w.write(Sample(f"{'a' if i < 100 else 'b'}/{i:03d}", [text_block("x")]))

    def first(n, **kw):
        return [s.key for _, s in zip(range(n), validation_source(str(tmp_path / "val"), 0,
                                                                   **kw))]

    assert {k[0] for k in first(40)} == {"a"}  # in file order: one source only
    mixed = first(40, shuffle=True)
    assert {k[0] for k in mixed} == {"a", "b"}
    assert first(40, shuffle=True) == mixed  # every evaluation scores the same samples
